//! The relay of whole events: the bytes of events cut from one upstream chunk go out as one
//! slice of it.

use bytes::{Bytes, BytesMut};

/// Joins whole events into one `Bytes`. Copies nothing when there is only one, or when the
/// events are contiguous slices of the upstream chunk they were cut from (the usual case: the
/// framer cuts events that lie inside one chunk as slices of it), which are forwarded as one
/// slice of that chunk.
#[derive(Default)]
pub(super) struct Joiner {
    /// The upstream chunk the events were cut from, if known.
    chunk: Option<Bytes>,
    first: Option<Bytes>,
    rest: Option<BytesMut>,
}

impl Joiner {
    pub(super) fn within(chunk: Bytes) -> Self {
        Self {
            chunk: Some(chunk),
            first: None,
            rest: None,
        }
    }

    /// An empty joiner for events of the same chunk as `other`'s.
    pub(super) fn within_chunk_of(other: &Self) -> Self {
        Self {
            chunk: other.chunk.clone(),
            first: None,
            rest: None,
        }
    }

    /// `first` then `next` as one slice of the chunk, when they are adjacent inside it.
    fn adjacent(&self, first: &Bytes, next: &Bytes) -> Option<Bytes> {
        let chunk = self.chunk.as_ref()?;
        let base = chunk.as_ptr() as usize;
        let start = (first.as_ptr() as usize).checked_sub(base)?;
        let mid = start + first.len();
        let next_start = (next.as_ptr() as usize).checked_sub(base)?;
        let end = next_start + next.len();
        (!first.is_empty() && next_start == mid && end <= chunk.len()).then(|| chunk.slice(start..end))
    }

    pub(super) fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.rest.is_none()
            && let Some(first) = &self.first
            && let Some(joined) = self.adjacent(first, &bytes)
        {
            self.first = Some(joined);
            return;
        }
        match (&mut self.first, &mut self.rest) {
            (None, _) => self.first = Some(bytes),
            (Some(first), None) => {
                let mut buf = BytesMut::with_capacity(first.len() + bytes.len());
                buf.extend_from_slice(first);
                buf.extend_from_slice(&bytes);
                self.rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&bytes),
        }
    }
    pub(super) fn finish(&mut self) -> Option<Bytes> {
        match (self.first.take(), self.rest.take()) {
            (_, Some(buf)) => Some(buf.freeze()),
            (first, None) => first,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_slices_of_one_chunk_are_one_slice_without_copy() {
        let chunk = Bytes::from_static(b"event: a\n\nevent: b\n\nevent: c\n\n");
        let mut j = Joiner::within(chunk.clone());
        j.push(chunk.slice(0..10));
        j.push(chunk.slice(10..20));
        j.push(chunk.slice(20..30));
        let out = j.finish().unwrap();
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn events_from_elsewhere_are_copied_in_order() {
        let chunk = Bytes::from_static(b"event: a\n\nevent: b\n\n");
        let spanning = Bytes::from_static(b"event: z\n\n");
        let mut j = Joiner::within(chunk.clone());
        j.push(spanning);
        j.push(chunk.slice(0..10));
        j.push(chunk.slice(10..20));
        assert_eq!(
            j.finish().unwrap(),
            Bytes::from_static(b"event: z\n\nevent: a\n\nevent: b\n\n")
        );
        let mut gap = Joiner::within(chunk.clone());
        gap.push(chunk.slice(0..5));
        gap.push(chunk.slice(10..20));
        assert_eq!(gap.finish().unwrap(), Bytes::from_static(b"eventevent: b\n\n"));
    }
}
