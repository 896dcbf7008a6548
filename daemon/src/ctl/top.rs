//! `patchbayctl top`: a live view of the daemon — health, channels by status, queue
//! depth and jobs by kind with throughput computed from successive `status` samples —
//! redrawn every interval on the alternate screen until `q`, Esc or Ctrl-C, after which
//! the terminal is as it was. Not on a terminal it prints one frame (two samples an
//! interval apart, so throughput is in it) and exits: `top | cat` is a snapshot.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use serde_json::{Value, json};

use crate::ctl::client::Client;
use crate::ctl::output::emit;
use crate::ctl::render::Ctx;
use crate::ctl::status_view;

/// One `status` result and when it arrived.
pub struct Sample {
    pub at: Instant,
    pub status: Value,
}

/// Jobs done per second by kind between two samples (the journal's `done` counts).
pub fn rates(prev: &Sample, cur: &Sample) -> BTreeMap<String, f64> {
    let secs = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let mut out = BTreeMap::new();
    let Some(kinds) = cur.status["jobs"].as_object() else {
        return out;
    };
    if secs <= 0.0 {
        return out;
    }
    for (kind, states) in kinds {
        let now = states["done"].as_i64().unwrap_or(0);
        let before = prev.status["jobs"][kind]["done"].as_i64().unwrap_or(0);
        // The journal forgets old jobs: a count that went down is no negative rate.
        out.insert(kind.clone(), (now - before).max(0) as f64 / secs);
    }
    out
}

/// The screen for `cur`; throughput needs the sample before it.
pub fn frame(prev: Option<&Sample>, cur: &Sample, interval: Duration, ctx: &Ctx) -> String {
    let rates = prev.map(|p| rates(p, cur));
    format!(
        "{}\n\nrefreshed every {} s; q, Esc or Ctrl-C quits",
        status_view::render(&cur.status, Some(&rates.unwrap_or_default()), ctx),
        interval.as_secs()
    )
}

async fn sample(client: &mut Client) -> anyhow::Result<Sample> {
    let status = client.call("status", json!({})).await?;
    Ok(Sample {
        at: Instant::now(),
        status,
    })
}

pub async fn run(client: &mut Client, interval: Duration, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        let first = sample(client).await?;
        tokio::time::sleep(interval).await;
        let second = sample(client).await?;
        emit(&frame(Some(&first), &second, interval, ctx))?;
        return Ok(());
    }
    let _screen = Screen::enter()?;
    let mut prev: Option<Sample> = None;
    loop {
        let cur = sample(client).await?;
        draw(&frame(prev.as_ref(), &cur, interval, ctx))?;
        prev = Some(cur);
        // Blocks this (current-thread) runtime while waiting for a key: nothing else
        // runs on it between samples.
        if quit_within(interval)? {
            return Ok(());
        }
    }
}

fn draw(frame: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    // Raw mode: a newline no longer returns the carriage.
    out.write_all(frame.replace('\n', "\r\n").as_bytes())?;
    out.flush()
}

/// Whether a quitting key came within `wait`; a resize or other key ends the wait
/// early only to redraw.
fn quit_within(wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        match event::read()? {
            Event::Key(key) if quits(&key) => return Ok(true),
            Event::Resize(..) => return Ok(false),
            _ => {}
        }
    }
}

/// `q`, Esc, or Ctrl-C (which raw mode delivers as a key, not as SIGINT).
pub fn quits(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// Raw mode on the alternate screen with the cursor hidden; dropping it (on return,
/// error or panic) restores the terminal.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}
