//! The drain window: how many confirms the drainer awaits at once.
//!
//! A failed pass may have left a window's worth of publishes routed but
//! unconfirmed, each republished (a duplicate) on the next pass, so each
//! failure halves the window (down to one: strict order); a window's worth
//! of confirms in a row doubles it back, up to the configured limit. A
//! broker that keeps failing passes then costs duplicates in proportion
//! to the progress it allows.

/// The current window and the confirms counted towards doubling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DrainWindow {
    /// The configured window, never exceeded.
    limit: usize,
    /// Confirms awaited at once now (1..=limit).
    size: usize,
    /// Confirms since `size` last changed.
    confirms: usize,
}

impl DrainWindow {
    /// A window at its configured `limit` (validated to be at least 1).
    pub(super) fn new(limit: usize) -> Self {
        DrainWindow {
            limit,
            size: limit,
            confirms: 0,
        }
    }

    /// Confirms awaited at once now.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// A pass failed with publishes given up: halve the window (not below
    /// 1) and start counting confirms again. True when the size changed.
    pub(super) fn shrink(&mut self) -> bool {
        let size = (self.size / 2).max(1);
        let changed = size != self.size;
        self.size = size;
        self.confirms = 0;
        changed
    }

    /// A confirm arrived: the window's worth in a row doubles it, up to
    /// the limit. True when the size changed.
    pub(super) fn confirmed(&mut self) -> bool {
        self.confirms += 1;
        if self.size < self.limit && self.confirms >= self.size {
            self.size = (self.size * 2).min(self.limit);
            self.confirms = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::DrainWindow;

    fn confirm(w: &mut DrainWindow, n: usize) {
        for _ in 0..n {
            w.confirmed();
        }
    }

    #[test]
    fn each_failure_halves_the_window_down_to_one() {
        let mut w = DrainWindow::new(8);
        let mut sizes = Vec::new();
        for _ in 0..5 {
            w.shrink();
            sizes.push(w.size());
        }
        assert_eq!(sizes, [4, 2, 1, 1, 1]);
    }

    #[test]
    fn a_windows_worth_of_confirms_doubles_it_up_to_the_limit() {
        let mut w = DrainWindow::new(12);
        for _ in 0..4 {
            w.shrink();
        }
        assert_eq!(w.size(), 1);
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let size = w.size();
            confirm(&mut w, size);
            sizes.push(w.size());
        }
        // 1, 2, 4, 8 confirms double it; the next doubling stops at 12.
        assert_eq!(sizes, [2, 4, 8, 12, 12]);
    }

    #[test]
    fn one_confirm_short_of_the_window_does_not_double_it() {
        let mut w = DrainWindow::new(16);
        w.shrink();
        w.shrink();
        assert_eq!(w.size(), 4);
        confirm(&mut w, 3);
        assert_eq!(w.size(), 4);
        assert!(w.confirmed(), "the fourth confirm doubles it");
        assert_eq!(w.size(), 8);
    }

    #[test]
    fn a_failure_restarts_the_count_towards_doubling() {
        let mut w = DrainWindow::new(16);
        w.shrink();
        assert_eq!(w.size(), 8);
        confirm(&mut w, 7);
        w.shrink();
        assert_eq!(w.size(), 4);
        confirm(&mut w, 3);
        assert_eq!(w.size(), 4, "confirms before the failure do not count");
        w.confirmed();
        assert_eq!(w.size(), 8);
    }

    #[test]
    fn at_the_limit_confirms_change_nothing_and_a_window_of_one_stays() {
        let mut w = DrainWindow::new(4);
        confirm(&mut w, 100);
        assert_eq!(w.size(), 4);
        let mut one = DrainWindow::new(1);
        assert!(!one.shrink());
        assert!(!one.confirmed());
        assert_eq!(one.size(), 1);
    }
}
