//! The poller: one task per bot on the plugin's shared runtime. getMe first (the
//! channel's number becomes `@username`), then getUpdates long polls until the channel
//! stops, the token is refused, or the host closes the instance. Each `message` update
//! is emitted (backing off while the host is busy); the offset passes a batch only once
//! the host's flush confirmed its events durable, and is then saved to the offset file.
//! Every wait and call gives way to the instance's cancel token at once. The poller's
//! calls go over the bot's own kept-alive connection (`link`).

use std::sync::Arc;
use std::time::Duration;

use patchbay_connector_sdk::runtime::{self, CancellationToken, tokio};
use patchbay_connector_sdk::{ChannelState, EmitError, Event, FlushError, Level};
use serde_json::{Value, json};

use crate::api::{ApiError, Me};
use crate::bot::Bot;
use crate::link::Link;
use crate::offset::OffsetFile;
use crate::update::{self, Skip};

/// One flush of the host; the poller flushes again while the daemon is merely behind.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Wait between polls while another client holds the bot (409).
const CONFLICT_WAIT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Sleeps `d` unless the channel stops first; returns whether to stop.
async fn wait(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        () = cancel.cancelled() => true,
    }
}

/// What the poller does after a failed call.
enum Next {
    Retry(Duration),
    Quit,
}

/// Turns an API error into a status and a wait; network trouble backs off 1 s → 60 s.
fn on_error(bot: &Bot, e: ApiError, backoff: &mut Duration) -> Next {
    match e {
        ApiError::InvalidToken { .. } => {
            bot.invalid_token(&e);
            Next::Quit
        }
        ApiError::RateLimited { retry_after, .. } => {
            let d = bot.rate_limited(retry_after);
            bot.log(Level::Warn, &format!("telegram: {e}"));
            Next::Retry(d)
        }
        ApiError::Conflict { .. } => {
            bot.log(Level::Warn, &format!("telegram: {e}"));
            bot.set_status(ChannelState::Error, Some(e.to_string()));
            Next::Retry(CONFLICT_WAIT)
        }
        ApiError::Rejected { .. } | ApiError::Unavailable(_) => {
            let wait = *backoff;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            let state = if matches!(e, ApiError::Rejected { .. }) {
                ChannelState::Error
            } else {
                ChannelState::Connecting
            };
            bot.log(
                Level::Warn,
                &format!("telegram: {e}; retrying in {}s", wait.as_secs()),
            );
            bot.set_status(state, Some(format!("{e}; retrying")));
            Next::Retry(wait)
        }
    }
}

/// Waits until the host has durably recorded every event emitted so far, so the offset
/// may pass them. `false`: it will not confirm them (stopping, or it lost one and will
/// replace this instance); the offset must stay.
async fn flushed(bot: &Bot, cancel: &CancellationToken) -> bool {
    loop {
        let r = tokio::select! {
            r = runtime::flush(bot.host(), FLUSH_WAIT) => r,
            () = cancel.cancelled() => return false,
        };
        match r {
            Ok(()) => return true,
            // A host older than flush: acknowledging after emit is all it allows.
            Err(FlushError::Unsupported) => return true,
            // The daemon is behind (back-pressure): keep the offset until it catches up.
            Err(FlushError::Timeout) if !cancel.is_cancelled() => continue,
            _ => return false,
        }
    }
}

/// getMe until it answers; `None`: stop (the channel stops, or the token is refused).
async fn who_am_i(bot: &Bot, link: &mut Link, cancel: &CancellationToken) -> Option<Me> {
    let mut backoff = Duration::from_secs(1);
    let no_params = json!({});
    loop {
        let call = link.call::<Me>("getMe", &no_params, bot.config.request_timeout());
        let result = tokio::select! {
            r = call => r,
            () = cancel.cancelled() => return None,
        };
        match result {
            Ok(me) => return Some(me),
            Err(e) => match on_error(bot, e, &mut backoff) {
                Next::Quit => return None,
                Next::Retry(d) => {
                    link.resting(d);
                    if wait(cancel, d).await {
                        return None;
                    }
                }
            },
        }
    }
}

/// Runs the offset file's blocking I/O on the runtime's blocking pool: on a worker
/// thread a slow disk's fsync would hold up every bot of the plugin (the runtime may
/// have a single worker).
async fn file_io<T: Send + 'static>(
    io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(io)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("the file task failed: {e}"))))
}

/// The offset saved in the file, if there is one and it reads.
async fn saved_offset(bot: &Bot, file: Option<&OffsetFile>) -> Option<i64> {
    let loaded = match file {
        Some(f) => {
            let f = f.clone();
            Some(file_io(move || f.load()).await)
        }
        None => None,
    };
    match loaded {
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            // Without the file Telegram's own confirmation still applies: at worst the
            // last batch comes again, and the daemon stores each message once.
            bot.log(
                Level::Warn,
                &format!("telegram: cannot read the offset file ({e}); starting without it"),
            );
            None
        }
        None => None,
    }
}

/// Emits a batch's updates in order; returns the offset past what was taken and
/// whether the host refused to take more (stopping or closed).
async fn emit_batch(
    bot: &Bot,
    updates: &[Value],
    mut next: Option<i64>,
    cancel: &CancellationToken,
) -> (Option<i64>, bool) {
    let counters = bot.board.counters();
    for u in updates {
        let Some(id) = update::update_id(u) else {
            bot.log(
                Level::Warn,
                "telegram: an update without update_id; skipped",
            );
            continue;
        };
        match update::to_inbound(u) {
            Ok(msg) => match runtime::emit(bot.host(), &Event::Inbound(msg), cancel).await {
                Ok(()) => counters.incr("inbound"),
                Err(EmitError::TooLarge) => {
                    bot.log(
                        Level::Warn,
                        &format!("telegram: update {id} is too large for the host; skipped"),
                    );
                }
                // Stopping or closed: this update was not taken, so the offset must not
                // pass it.
                Err(_) => return (next, true),
            },
            Err(skip) => {
                counters.incr("skipped");
                if let Skip::Malformed(why) = skip {
                    bot.log(
                        Level::Warn,
                        &format!("telegram: update {id} is unreadable ({why}); skipped"),
                    );
                }
            }
        }
        // An id at i64::MAX cannot be passed; it simply comes again (and is stored
        // once) rather than wrapping the offset around.
        if let Some(after) = id.checked_add(1) {
            next = Some(next.map_or(after, |n: i64| n.max(after)));
        }
    }
    (next, false)
}

/// The poller task of one bot.
pub async fn run(bot: Arc<Bot>, cancel: CancellationToken) {
    let c = &bot.config;
    // Api::new parsed the same prefix, so this cannot fail; if it did, say so and stop.
    let mut link = match bot.api.link() {
        Ok(l) => l,
        Err(e) => {
            bot.log(Level::Error, &format!("telegram: {e}"));
            bot.set_status(ChannelState::Error, Some(e.to_string()));
            return;
        }
    };
    let Some(me) = who_am_i(&bot, &mut link, &cancel).await else {
        return;
    };
    let bot_id = me.id.to_string();
    bot.log(
        Level::Info,
        &format!(
            "telegram: connected as @{} ({})",
            me.username.as_deref().unwrap_or("?"),
            me.first_name
        ),
    );
    *bot.me.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
    let file = c.state_dir.as_deref().map(|d| OffsetFile::new(d, &bot_id));
    let mut offset = saved_offset(&bot, file.as_ref()).await;
    *bot.offset.lock().unwrap_or_else(|p| p.into_inner()) = offset;
    bot.set_status(ChannelState::Connected, None);
    let mut backoff = Duration::from_secs(1);

    // Long polls may legitimately last poll_timeout_secs; the client waits a bit more.
    let poll_timeout = Duration::from_secs(c.poll_timeout_secs) + c.request_timeout();
    while !cancel.is_cancelled() {
        let mut params = json!({
            "timeout": c.poll_timeout_secs,
            "allowed_updates": ["message"],
        });
        if let (Some(o), Some(p)) = (offset, params.as_object_mut()) {
            p.insert("offset".into(), o.into());
        }
        let call = link.call::<Vec<Value>>("getUpdates", &params, poll_timeout);
        let result = tokio::select! {
            r = call => r,
            // Dropping the call closes its connection: nothing of it arrives later.
            () = cancel.cancelled() => return,
        };
        let updates = match result {
            Ok(u) => u,
            Err(e) => match on_error(&bot, e, &mut backoff) {
                Next::Quit => return,
                Next::Retry(d) => {
                    link.resting(d);
                    if wait(&cancel, d).await {
                        return;
                    }
                    continue;
                }
            },
        };
        backoff = Duration::from_secs(1);
        bot.set_status(ChannelState::Connected, None);
        let (next, closed) = emit_batch(&bot, &updates, offset, &cancel).await;
        if next != offset {
            // Only what the host has durably recorded may be confirmed to Telegram:
            // the offset is how Telegram forgets updates.
            if !flushed(&bot, &cancel).await {
                return;
            }
            offset = next;
            *bot.offset.lock().unwrap_or_else(|p| p.into_inner()) = offset;
            if let (Some(f), Some(o)) = (&file, offset)
                && let Err(e) = {
                    let f = f.clone();
                    file_io(move || f.save(o)).await
                }
            {
                bot.log(
                    Level::Warn,
                    &format!("telegram: cannot save the offset: {e}"),
                );
            }
        }
        if closed {
            return;
        }
    }
}
