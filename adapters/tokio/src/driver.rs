//! The tokio transport under [`ClientCall`]: one upstream exchange at a time, raced against
//! the call's deadline on one lazily armed runtime timer.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_core::future::BoxFuture;
use http_body::Body as _;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use keypool_core::call::{Attempt, CallConfig, Credential, Request, TransportError};
use keypool_core::client::{AsyncTransport, ClientCall, Clocks, Io, Transport};

use crate::transport::{Sending, Unanswered};

/// A boxed error, as tower services and bodies produce them.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// An upstream response body: hyper's own (the client's, not boxed), or whatever a tower
/// service produced.
pub(crate) enum UpstreamBody {
    /// From the hyper-util client.
    Hyper(hyper::body::Incoming),
    /// From another service (the tower layer's inner service).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl UpstreamBody {
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Boxed(body) => body.is_end_stream(),
        }
    }

    /// The next frame; its error as the transport sees it.
    async fn next_frame(&mut self) -> Option<Result<http_body::Frame<Bytes>, TransportError>> {
        match self {
            Self::Hyper(body) => Some(body.frame().await?.map_err(|e| transport_error(&e))),
            Self::Boxed(body) => Some(body.frame().await?.map_err(|e| transport_error(&*e))),
        }
    }
}

/// A started upstream request: resolves to its response head. The client's own requests stay
/// in place in the call (no allocation per attempt); a tower service's future is boxed.
#[allow(
    clippy::large_enum_variant,
    reason = "kept inline on purpose: the exchange lives in the call's one allocation"
)]
pub(crate) enum Exchange {
    /// On the client's hyper-util client.
    Client(Sending),
    /// Anything else.
    Boxed(BoxFuture<'static, Result<http::Response<UpstreamBody>, BoxError>>),
}

impl Future for Exchange {
    type Output = Result<http::Response<UpstreamBody>, Unanswered<BoxError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Client(sending) => Pin::new(sending).poll(cx).map(|result| match result {
                Ok(response) => Ok(response.map(UpstreamBody::Hyper)),
                Err(Unanswered::Stale(e)) => Err(Unanswered::Stale(e.into())),
                Err(Unanswered::Failed(e)) => Err(Unanswered::Failed(e.into())),
            }),
            Self::Boxed(future) => future.as_mut().poll(cx).map_err(Unanswered::Failed),
        }
    }
}

/// Whatever sends an attempt upstream: the hyper-util client or a tower service.
pub(crate) trait Upstream: Send + 'static {
    /// Starts this attempt; the returned future resolves to the response head.
    fn start(&mut self, attempt: Attempt) -> Exchange;

    /// Sends this attempt once more, after its exchange died on a stale pooled connection
    /// ([`Unanswered::Stale`]); the new exchange does not report that again.
    fn resend(&mut self, attempt: Attempt) -> Exchange {
        self.start(attempt)
    }
}

/// What sends a call's attempts: the client's own hyper-util client, kept inline (no
/// allocation per call), or any other [`Upstream`] (a tower service), boxed.
pub(crate) enum Sender {
    /// The [`Client`](crate::Client)'s.
    Client(crate::ClientUpstream),
    /// Anything else.
    Other(Box<dyn Upstream>),
}

impl Sender {
    fn start(&mut self, attempt: Attempt) -> Exchange {
        match self {
            Self::Client(client) => client.start(attempt),
            Self::Other(upstream) => upstream.start(attempt),
        }
    }

    fn resend(&mut self, attempt: Attempt) -> Exchange {
        match self {
            Self::Client(client) => client.resend(attempt),
            Self::Other(upstream) => upstream.resend(attempt),
        }
    }
}

/// A call driven on tokio. Dropping it cancels the upstream request.
pub(crate) type Driver = ClientCall<Tokio>;

/// Starts a call over `upstream`.
pub(crate) fn driver(
    upstream: Sender,
    request: Request,
    credential: Credential,
    config: &CallConfig,
) -> Box<Driver> {
    let transport = Tokio {
        upstream,
        timer: Timer {
            sleep: None,
            armed: Instant::now(),
            floor: config.timeouts.idle,
        },
    };
    Box::new(ClientCall::new(transport, request, credential, config))
}

/// The current upstream exchange.
#[allow(
    clippy::large_enum_variant,
    reason = "the exchange is kept inline on purpose (see `Exchange`)"
)]
pub(crate) enum Current {
    /// Sent, waiting for the head.
    Head(Exchange),
    /// Reading the body.
    Body(UpstreamBody),
    /// The exchange failed before its head.
    Failed,
}

/// Starts attempts with an [`Upstream`] and awaits the next head or body frame of the current
/// exchange, or the call's deadline.
pub(crate) struct Tokio {
    upstream: Sender,
    timer: Timer,
}

/// The call's one runtime timer, armed lazily (see [`Timer::arm`]).
///
/// Registering a tokio timer is not free: a deadline earlier than every other one makes the
/// runtime wake its IO driver (a syscall, and a sleeping worker thread woken). The call's
/// deadline moves with every body chunk (the idle timeout), so a fresh timer per wait would
/// pay that several times per request. Instead one timer lives as long as the call; it is only
/// moved earlier when a deadline needs it, and when it fires before the call's deadline
/// (the deadline moved later meanwhile), it is moved on and the wait goes on.
struct Timer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the timer fires (meaningful while `sleep` is set).
    armed: Instant,
    /// The shortest timeout the call uses after the head (its idle timeout): the first arming
    /// is no later than `now + floor`, so a later idle deadline never has to move it earlier.
    floor: Duration,
}

impl Transport for Tokio {
    type Exchange = Current;

    fn start(&mut self, attempt: Attempt) -> Current {
        Current::Head(self.upstream.start(attempt))
    }

    fn resend(&mut self, attempt: Attempt) -> Current {
        Current::Head(self.upstream.resend(attempt))
    }

    const CLOCKS: Clocks = Clocks {
        now: Instant::now,
        wall: SystemTime::now,
    };
}

impl AsyncTransport for Tokio {
    async fn next_io(&mut self, current: &mut Current, deadline: Option<Instant>) -> Io {
        match deadline {
            None => current.next_io().await,
            Some(deadline) => {
                let sleep = self.timer.arm(deadline);
                // The exchange first (no random branch order): an input that is ready is
                // taken without touching the timer, and one that comes with the deadline
                // still counts.
                tokio::select! {
                    biased;
                    io = current.next_io() => io,
                    () = sleep => Io::TimedOut,
                }
            }
        }
    }
}

impl Current {
    /// The next head or body frame. Cancel safe: an unfinished head future stays in place.
    async fn next_io(&mut self) -> Io {
        let body = match self {
            Self::Failed => return Io::Error(TransportError::Eof),
            Self::Head(exchange) => match exchange.await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    *self = Self::Body(body);
                    return Io::Head(parts.status, parts.headers);
                }
                Err(Unanswered::Stale(e)) => {
                    *self = Self::Failed;
                    return Io::Resend(transport_error(&*e));
                }
                Err(Unanswered::Failed(e)) => {
                    *self = Self::Failed;
                    return Io::Error(transport_error(&*e));
                }
            },
            Self::Body(body) => body,
        };
        loop {
            // A body that knows it is complete (all of its content-length read) ends here: one
            // more poll would only ask the connection task for data that cannot come, waking it
            // for nothing.
            if body.is_end_stream() {
                return Io::End;
            }
            match body.next_frame().await {
                None => return Io::End,
                Some(Ok(frame)) => {
                    // A frame that is not data (trailers) has nothing to report: read on.
                    if let Ok(bytes) = frame.into_data() {
                        return Io::Chunk(bytes);
                    }
                }
                Some(Err(e)) => return Io::Error(e),
            }
        }
    }
}

impl Timer {
    /// Makes sure the timer fires no later than `deadline`, and returns a future that resolves
    /// once `deadline` has passed (firing early only moves the timer on).
    fn arm(&mut self, deadline: Instant) -> impl Future<Output = ()> + '_ {
        match &mut self.sleep {
            Some(sleep) if self.armed > deadline => {
                sleep.as_mut().reset(deadline.into());
                self.armed = deadline;
            }
            Some(_) => {}
            None => {
                // tokio's clock (the same as std's, except in tests with paused time).
                let at = tokio::time::Instant::now()
                    .into_std()
                    .checked_add(self.floor)
                    .map_or(deadline, |floor| deadline.min(floor));
                self.sleep = Some(Box::pin(tokio::time::sleep_until(at.into())));
                self.armed = at;
            }
        }
        async move {
            while let Some(sleep) = self.sleep.as_mut() {
                sleep.as_mut().await;
                if self.armed >= deadline {
                    return;
                }
                // Fired for an earlier deadline that has since moved on.
                sleep.as_mut().reset(deadline.into());
                self.armed = deadline;
            }
        }
    }
}

/// Maps a hyper, hyper-util, rustls or IO error (anywhere in the source chain) to what the
/// call needs to know.
pub(crate) fn transport_error(error: &(dyn StdError + 'static)) -> TransportError {
    let mut connect = false;
    let mut found = None;
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return TransportError::Tls;
        }
        if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= e.is_connect();
        }
        if let Some(e) = e.downcast_ref::<hyper::Error>()
            && found.is_none()
        {
            found = hyper_kind(e);
        }
        if let Some(e) = e.downcast_ref::<io::Error>() {
            // `io::Error::source` skips the wrapped error itself; look at it first.
            if let Some(inner) = e.get_ref() {
                next = Some(inner);
                if found.is_none() && !matches!(e.kind(), io::ErrorKind::Other) {
                    found = Some(e.kind().into());
                }
                continue;
            }
            if found.is_none() {
                found = Some(e.kind().into());
            }
        }
        next = e.source();
    }
    if connect {
        return TransportError::Connect;
    }
    found.unwrap_or(TransportError::Reset)
}

fn hyper_kind(e: &hyper::Error) -> Option<TransportError> {
    if e.is_timeout() {
        Some(TransportError::Timeout)
    } else if e.is_incomplete_message() {
        Some(TransportError::Eof)
    } else if e.is_parse() || e.is_parse_status() {
        Some(TransportError::Protocol)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Timer;

    fn timer(floor: Duration) -> Timer {
        Timer {
            sleep: None,
            armed: tokio::time::Instant::now().into_std(),
            floor,
        }
    }

    /// Whether the timer's future for `deadline` resolves within `within` of simulated time.
    async fn fires_within(timer: &mut Timer, deadline: tokio::time::Instant, within: Duration) -> bool {
        tokio::time::timeout(within, timer.arm(deadline.into_std()))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_keeps_the_timer_and_still_waits_for_itself() {
        let start = tokio::time::Instant::now();
        let mut t = timer(Duration::from_secs(120));
        // First wait: a 600 s deadline arms the timer at the 120 s floor.
        assert!(!fires_within(&mut t, start + Duration::from_secs(600), Duration::from_secs(10)).await);
        assert_eq!(t.armed, (start + Duration::from_secs(120)).into_std());
        // A later deadline does not move it; the early firing at 120 s is not a timeout.
        let deadline = start + Duration::from_secs(130);
        assert!(!fires_within(&mut t, deadline, Duration::from_secs(115)).await);
        assert!(tokio::time::Instant::now() >= start + Duration::from_secs(125));
        assert!(fires_within(&mut t, deadline, Duration::from_secs(6)).await);
        assert_eq!(tokio::time::Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_timer() {
        let start = tokio::time::Instant::now();
        let mut t = timer(Duration::from_secs(120));
        assert!(!fires_within(&mut t, start + Duration::from_secs(600), Duration::from_secs(1)).await);
        let deadline = start + Duration::from_secs(5);
        assert!(fires_within(&mut t, deadline, Duration::from_secs(10)).await);
        assert_eq!(tokio::time::Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_floor_arms_at_the_deadline() {
        let start = tokio::time::Instant::now();
        let mut t = timer(Duration::MAX);
        let deadline = start + Duration::from_secs(3);
        assert!(fires_within(&mut t, deadline, Duration::from_secs(4)).await);
        assert_eq!(tokio::time::Instant::now(), deadline);
    }
}
