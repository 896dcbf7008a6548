//! The embedded default's demo: when patchbayd runs without a configuration file on an
//! empty store, it creates a demo account with credit and a loopback channel that sends
//! a message every couple of seconds, so the README's first command shows work happening.
//! With a configuration file (any real deployment) nothing is created.

use patchbay_jobs::store::{NewAccount, NewUser};
use serde_json::json;

use crate::app::App;

pub async fn seed(app: &App) {
    match app.store.account_ids(0, 1).await {
        Ok(ids) if ids.is_empty() => {}
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check for accounts; no demo account");
            return;
        }
    }
    let new = NewAccount {
        name: "Demo".into(),
        currency: "USD".into(),
        admin: NewUser {
            name: "Demo Admin".into(),
            email: "admin@demo.example".into(),
        },
    };
    let account = match app.store.create_account(&new).await {
        Ok((account, _)) => account,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the demo account");
            return;
        }
    };
    if let Err(e) = app.store.topup(account.id, 1_000_000, "demo-credit").await {
        tracing::warn!(error = %e, "cannot credit the demo account");
    }
    if app.plugins.registry().get("loopback").is_none() {
        tracing::info!(
            account = account.id,
            "demo account created without a channel: no loopback connector in plugins.dir \
             (build it with `cargo build --release --workspace`)"
        );
        return;
    }
    let config = json!({
        "number": "+15550000001", "display_name": "Demo", "rate_per_sec": 0.5, "clients": 3,
    });
    let added = app
        .store
        .add_channel_charged(
            account.id,
            "loopback",
            "Demo loopback",
            &config,
            app.today(),
            &app.prices(),
        )
        .await;
    match added {
        Ok((channel, _)) => {
            tracing::info!(
                account = account.id,
                channel = channel.id,
                "demo account with a loopback channel created; try `patchbayctl chat list --account 1`"
            );
            app.leases.wake();
        }
        Err(e) => tracing::warn!(error = %e, "cannot add the demo channel"),
    }
}
