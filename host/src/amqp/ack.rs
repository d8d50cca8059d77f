//! Acknowledgement bookkeeping for one consumer channel: which delivery tags
//! are out, which are finished, and which `basic.ack` frames to send.
//!
//! With coalescing on, finished acks are held for a few milliseconds and
//! sent as one `basic.ack(multiple = true)` covering the longest run of
//! finished tags below the lowest tag still being handled, so deliveries
//! may finish in any order. Tags stuck above a slow delivery are acked one
//! by one once they have waited `hold` (so a slow delivery cannot hold back
//! the prefetch window forever). Nacks and rejects are never coalesced.
//! Pure: the consumer task sends the frames.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How a delivery was finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`, requeued or not (dead-lettered when not).
    Nack {
        /// Put the message back on the queue.
        requeue: bool,
    },
    /// `basic.reject`, requeued or not.
    Reject {
        /// Put the message back on the queue.
        requeue: bool,
    },
}

/// A frame to send on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckFrame {
    /// `basic.ack`.
    Ack {
        /// Delivery tag.
        tag: u64,
        /// Also ack every unacked tag below.
        multiple: bool,
    },
    /// `basic.nack` of one tag.
    Nack {
        /// Delivery tag.
        tag: u64,
        /// Requeue.
        requeue: bool,
    },
    /// `basic.reject` of one tag.
    Reject {
        /// Delivery tag.
        tag: u64,
        /// Requeue.
        requeue: bool,
    },
}

/// What [`AckBook::finish`] made of a finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Send this frame now.
    Send(AckFrame),
    /// Held for coalescing; sent by a later [`AckBook::flush`].
    Held,
    /// The tag is not outstanding (finished twice, or unknown): ignored.
    Unknown,
}

/// The ack state of one channel.
#[derive(Debug)]
pub struct AckBook {
    coalesce: bool,
    outstanding: BTreeSet<u64>,
    ready: BTreeMap<u64, Instant>,
}

impl AckBook {
    /// An empty book; `coalesce` holds acks for [`AckBook::flush`].
    pub fn new(coalesce: bool) -> Self {
        Self {
            coalesce,
            outstanding: BTreeSet::new(),
            ready: BTreeMap::new(),
        }
    }

    /// A delivery with `tag` was handed out.
    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.insert(tag);
    }

    /// The delivery `tag` finished with `kind` at `now`.
    pub fn finish(&mut self, tag: u64, kind: AckKind, now: Instant) -> Finish {
        if !self.outstanding.remove(&tag) {
            return Finish::Unknown;
        }
        match kind {
            AckKind::Ack if self.coalesce => {
                self.ready.insert(tag, now);
                Finish::Held
            }
            AckKind::Ack => Finish::Send(AckFrame::Ack {
                tag,
                multiple: false,
            }),
            AckKind::Nack { requeue } => Finish::Send(AckFrame::Nack { tag, requeue }),
            AckKind::Reject { requeue } => Finish::Send(AckFrame::Reject { tag, requeue }),
        }
    }

    /// The frames to send now: one multiple ack for the finished run below
    /// the lowest outstanding tag, plus single acks for tags above it that
    /// waited at least `hold`.
    pub fn flush(&mut self, now: Instant, hold: Duration) -> Vec<AckFrame> {
        let mut frames = Vec::new();
        let low = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let above = self.ready.split_off(&low);
        let run = std::mem::replace(&mut self.ready, above);
        match (run.len(), run.keys().next_back()) {
            (0, _) | (_, None) => {}
            (1, Some(&tag)) => frames.push(AckFrame::Ack {
                tag,
                multiple: false,
            }),
            (_, Some(&tag)) => frames.push(AckFrame::Ack {
                tag,
                multiple: true,
            }),
        }
        let stale: Vec<u64> = self
            .ready
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= hold)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in stale {
            self.ready.remove(&tag);
            frames.push(AckFrame::Ack {
                tag,
                multiple: false,
            });
        }
        frames
    }

    /// Acks held and not yet sent.
    pub fn held(&self) -> usize {
        self.ready.len()
    }

    /// Deliveries handed out and not finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Nothing outstanding and nothing held.
    pub fn is_idle(&self) -> bool {
        self.outstanding.is_empty() && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(20);

    fn book(tags: std::ops::RangeInclusive<u64>) -> AckBook {
        let mut b = AckBook::new(true);
        for t in tags {
            b.delivered(t);
        }
        b
    }

    /// Acked set implied by a frame sequence, given what was delivered.
    fn settle(delivered: &[u64], frames: &[AckFrame]) -> BTreeSet<u64> {
        let mut settled = BTreeSet::new();
        for f in frames {
            match *f {
                AckFrame::Ack {
                    tag,
                    multiple: true,
                } => settled.extend(delivered.iter().copied().filter(|t| *t <= tag)),
                AckFrame::Ack { tag, .. }
                | AckFrame::Nack { tag, .. }
                | AckFrame::Reject { tag, .. } => {
                    settled.insert(tag);
                }
            }
        }
        settled
    }

    #[test]
    fn in_order_run_becomes_one_multiple_ack() {
        let mut b = book(1..=5);
        let now = Instant::now();
        for t in 1..=5 {
            assert_eq!(b.finish(t, AckKind::Ack, now), Finish::Held);
        }
        assert_eq!(
            b.flush(now, HOLD),
            vec![AckFrame::Ack {
                tag: 5,
                multiple: true
            }]
        );
        assert!(b.is_idle());
    }

    #[test]
    fn out_of_order_never_acks_an_unfinished_tag() {
        let mut b = book(1..=6);
        let now = Instant::now();
        for t in [2, 3, 5, 6] {
            b.finish(t, AckKind::Ack, now);
        }
        // 1 is still being handled: nothing may be acked yet.
        assert_eq!(b.flush(now, HOLD), vec![]);
        b.finish(1, AckKind::Ack, now);
        // 1..=3 is a finished run; 4 is still out.
        assert_eq!(
            b.flush(now, HOLD),
            vec![AckFrame::Ack {
                tag: 3,
                multiple: true
            }]
        );
        assert_eq!(b.held(), 2);
        b.finish(4, AckKind::Ack, now);
        assert_eq!(
            b.flush(now, HOLD),
            vec![AckFrame::Ack {
                tag: 6,
                multiple: true
            }]
        );
        assert!(b.is_idle());
    }

    #[test]
    fn held_tags_above_a_slow_delivery_go_out_singly_after_hold() {
        let mut b = book(1..=4);
        let t0 = Instant::now();
        for t in [2, 3, 4] {
            b.finish(t, AckKind::Ack, t0);
        }
        assert_eq!(b.flush(t0, HOLD), vec![]);
        let frames = b.flush(t0 + HOLD, HOLD);
        assert_eq!(
            frames,
            vec![
                AckFrame::Ack {
                    tag: 2,
                    multiple: false
                },
                AckFrame::Ack {
                    tag: 3,
                    multiple: false
                },
                AckFrame::Ack {
                    tag: 4,
                    multiple: false
                },
            ]
        );
        assert_eq!(b.outstanding(), 1);
        b.finish(1, AckKind::Ack, t0);
        assert_eq!(
            b.flush(t0 + HOLD, HOLD),
            vec![AckFrame::Ack {
                tag: 1,
                multiple: false
            }]
        );
    }

    #[test]
    fn nack_goes_out_at_once_and_is_not_covered_twice() {
        let mut b = book(1..=4);
        let now = Instant::now();
        b.finish(1, AckKind::Ack, now);
        assert_eq!(
            b.finish(2, AckKind::Nack { requeue: true }, now),
            Finish::Send(AckFrame::Nack {
                tag: 2,
                requeue: true
            })
        );
        b.finish(4, AckKind::Ack, now);
        // 3 is out: only 1 can be acked.
        assert_eq!(
            b.flush(now, HOLD),
            vec![AckFrame::Ack {
                tag: 1,
                multiple: false
            }]
        );
        b.finish(3, AckKind::Reject { requeue: false }, now);
        assert_eq!(
            b.flush(now, HOLD),
            vec![AckFrame::Ack {
                tag: 4,
                multiple: false
            }]
        );
    }

    #[test]
    fn double_finish_is_unknown() {
        let mut b = book(1..=1);
        let now = Instant::now();
        assert_eq!(b.finish(1, AckKind::Ack, now), Finish::Held);
        assert_eq!(b.finish(1, AckKind::Ack, now), Finish::Unknown);
        assert_eq!(b.finish(9, AckKind::Ack, now), Finish::Unknown);
    }

    #[test]
    fn shuffled_finishes_settle_exactly_the_acked_tags() {
        use rand::seq::SliceRandom;
        for round in 0..50 {
            let n = 200u64;
            let delivered: Vec<u64> = (1..=n).collect();
            let mut b = book(1..=n);
            let mut order = delivered.clone();
            order.shuffle(&mut rand::rng());
            let t0 = Instant::now();
            let mut frames = Vec::new();
            let mut nacked = BTreeSet::new();
            for (i, t) in order.iter().enumerate() {
                let kind = if (t + round) % 17 == 0 {
                    nacked.insert(*t);
                    AckKind::Nack { requeue: false }
                } else {
                    AckKind::Ack
                };
                if let Finish::Send(f) = b.finish(*t, kind, t0) {
                    frames.push(f);
                }
                if i % 7 == 0 {
                    // Before each flush, every tag a multiple ack would
                    // cover must be finished.
                    let before = frames.len();
                    frames.extend(b.flush(t0, HOLD));
                    for f in &frames[before..] {
                        if let AckFrame::Ack {
                            tag,
                            multiple: true,
                        } = f
                        {
                            assert!(
                                order[..=i].iter().filter(|x| **x <= *tag).count() as u64 == *tag,
                                "multiple ack up to {tag} covers an unfinished tag"
                            );
                        }
                    }
                }
            }
            frames.extend(b.flush(t0, HOLD));
            assert!(b.is_idle());
            assert_eq!(
                settle(&delivered, &frames),
                delivered.iter().copied().collect()
            );
            let singles = frames
                .iter()
                .filter(|f| {
                    matches!(
                        f,
                        AckFrame::Ack {
                            multiple: false,
                            ..
                        }
                    )
                })
                .count();
            assert!(
                frames.len() < n as usize,
                "coalescing saved frames: {} ({singles} single)",
                frames.len()
            );
        }
    }
}
