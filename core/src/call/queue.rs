//! The call's output queues: first in, first out, the first item held inline.

use std::collections::VecDeque;

/// A FIFO queue that keeps its oldest item inline and only allocates when a second item is
/// queued behind it. A call's outputs are drained as they come, so its queues rarely hold more
/// than one: a `VecDeque` alone would allocate for that one on every request.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    /// The oldest item, when there is one and it has not spilled: when `first` is empty,
    /// `rest` holds everything.
    first: Option<T>,
    rest: VecDeque<T>,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            first: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> Queue<T> {
    pub(crate) fn push_back(&mut self, item: T) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Queue;
    use std::collections::VecDeque;

    /// Any interleaving of pushes and pops gives the items back in the order a `VecDeque` does.
    #[test]
    fn keeps_fifo_order_like_a_vecdeque() {
        // A fixed pseudo-random walk over pushes, pops and clears.
        let mut state = 0x2545_f491_u32;
        let mut queue = Queue::default();
        let mut model = VecDeque::new();
        for item in 0..10_000u32 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match state % 7 {
                0..=2 => {
                    queue.push_back(item);
                    model.push_back(item);
                }
                3..=5 => assert_eq!(queue.pop_front(), model.pop_front()),
                _ if state.is_multiple_of(61) => {
                    queue.clear();
                    model.clear();
                }
                _ => {}
            }
            assert_eq!(queue.is_empty(), model.is_empty());
        }
        while let Some(item) = model.pop_front() {
            assert_eq!(queue.pop_front(), Some(item));
        }
        assert_eq!(queue.pop_front(), None);
    }

    #[test]
    fn one_item_at_a_time_never_allocates() {
        let mut queue = Queue::default();
        for item in 0..100 {
            queue.push_back(item);
            assert_eq!(queue.pop_front(), Some(item));
        }
        assert_eq!(queue.rest.capacity(), 0);
    }
}
