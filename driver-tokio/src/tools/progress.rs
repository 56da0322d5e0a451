//! Progress on long work (`cotal bench`, `cotal chaos`): an `indicatif` bar or spinner on
//! stderr when it is a terminal, and nothing of it when it is not (a pipe, a file, a CI log): the
//! tools' output there stays as it was, byte for byte.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

/// Whether stderr is a terminal (a person watching).
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// One bar (a known length) or spinner on stderr, hidden off a terminal. Cleared when dropped.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

fn draw_target() -> ProgressDrawTarget {
    if on_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

impl Progress {
    /// A bar of `len` steps of `unit` (e.g. `"s"`, `"copies"`).
    pub fn bar(len: u64, unit: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len), draw_target());
        let template =
            format!("{{spinner}} {{elapsed:>4}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{wide_msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// A spinner with a message (no known length).
    pub fn spinner() -> Self {
        let bar = ProgressBar::with_draw_target(None, draw_target());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// Moves to `pos` (at most the length).
    pub fn set(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Changes the length (and keeps the position).
    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
    }

    /// The text after the bar.
    pub fn message(&self, text: impl Into<Cow<'static, str>>) {
        self.bar.set_message(text);
    }

    /// Whether it draws at all (stderr is a terminal).
    pub fn visible(&self) -> bool {
        !self.bar.is_hidden()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_only_on_a_terminal() {
        // Under a test runner stderr is usually a pipe (CI): hidden; on a terminal: drawn.
        let bar = Progress::bar(10, "s");
        bar.set(3);
        bar.message("three");
        assert_eq!(bar.visible(), on_terminal());
        assert_eq!(Progress::spinner().visible(), on_terminal());
    }
}
