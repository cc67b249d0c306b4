//! Build progress: a bar on a terminal, plain log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Reports build progress.
#[derive(Debug)]
pub enum Progress {
    /// An indicatif bar on stderr.
    Bar(ProgressBar),
    /// `tracing` info lines (logs, CI, pipes).
    Log,
}

impl Progress {
    /// A bar when stderr is a terminal, log lines otherwise.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Bar(ProgressBar::hidden())
        } else {
            Progress::Log
        }
    }

    /// A new stage with `len` steps (0: a spinner).
    pub(crate) fn stage(&mut self, n: usize, of: usize, what: &str, len: u64) {
        match self {
            Progress::Bar(old) => {
                old.finish_and_clear();
                let bar = if len == 0 { ProgressBar::new_spinner() } else { ProgressBar::new(len) };
                let template = if len == 0 {
                    format!("[{n}/{of}] {{spinner}} {what} {{msg}} ({{elapsed}})")
                } else {
                    format!("[{n}/{of}] {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})")
                };
                if let Ok(style) = ProgressStyle::with_template(&template) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.enable_steady_tick(Duration::from_millis(120));
                *old = bar;
            }
            Progress::Log => tracing::info!("runtime build [{n}/{of}] {what}"),
        }
    }

    /// One step of the current stage done; `msg` says which.
    pub(crate) fn step(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => {
                bar.inc(1);
                bar.set_message(msg.to_string());
            }
            Progress::Log => tracing::info!("runtime build: {msg}"),
        }
    }

    /// Update the message without a step.
    pub(crate) fn note(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.set_message(msg.to_string()),
            Progress::Log => tracing::info!("runtime build: {msg}"),
        }
    }

    pub(crate) fn done(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
