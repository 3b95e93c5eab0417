//! What the hub and the operator control on a live session: SIGHUP reloads of the config and policy,
//! token rotation (saved to the config file), revocation (forgetting the registration), and draining.

use super::*;
use cla_common::tls::Trust;

impl Hup {
    pub(super) fn new() -> Hup {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            Hup { signal }
        }
        #[cfg(not(unix))]
        Hup {}
    }

    pub(super) async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.signal.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// Applies a reload (SIGHUP) to the settings and to `masks`: `tags`, `envs` (sent to the hub at once),
/// `policy`, `mask` and `workdir` (for jobs started from now on), each named in the log when it changed.
/// Other settings that changed are named in a warning and keep their old values until a restart
/// (`docs/config.md` lists both). Returns the new tags and envs if they changed.
pub(super) fn reload(
    opts: &RunOptions,
    settings: &mut WorkerSettings,
    reporter: &Reporter,
    masks: &mut Masks,
) -> Option<(Vec<String>, Vec<String>)> {
    let f = opts.reload.as_ref()?;
    let Reloaded {
        settings: fresh,
        restart_needed: mut restart,
    } = match f() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("SIGHUP: config not reloaded (the worker goes on as it was): {e}");
            return None;
        }
    };
    let mut applied: Vec<&str> = Vec::new();
    if fresh.policy != settings.policy {
        settings.policy = fresh.policy.clone();
        applied.push("policy");
    }
    if fresh.mask != settings.mask {
        // The token masked is the one in use, which a changed `token:` does not replace.
        let mut next = settings.clone();
        next.mask = fresh.mask.clone();
        match masks_of(&next) {
            Ok(m) => {
                *masks = m;
                settings.mask = next.mask;
                applied.push("mask");
            }
            Err(e) => tracing::warn!("SIGHUP: mask not reloaded (the old one stays): {e}"),
        }
    }
    if fresh.workdir != settings.workdir {
        settings.workdir = fresh.workdir.clone();
        applied.push("workdir");
    }
    let labels = (fresh.tags != settings.tags || fresh.envs != settings.envs).then(|| {
        settings.tags = fresh.tags.clone();
        settings.envs = fresh.envs.clone();
        reporter.update(|s| {
            s.tags = fresh.tags.clone();
            s.envs = fresh.envs.clone();
        });
        (fresh.tags.clone(), fresh.envs.clone())
    });
    let mut needs = restart_only_changes(settings, &fresh);
    needs.append(&mut restart);
    // One line per setting applied (`SIGHUP: policy reloaded`), tags and envs with their new values.
    for name in &applied {
        tracing::info!("SIGHUP: {name} reloaded");
    }
    if labels.is_some() {
        tracing::info!(tags = ?settings.tags, envs = ?settings.envs, "SIGHUP: tags/envs reloaded");
    } else if applied.is_empty() {
        tracing::info!("SIGHUP: config reloaded, no reloadable setting changed");
    }
    if !needs.is_empty() {
        tracing::warn!(
            "SIGHUP: {} changed but only a restart of the worker applies it; until then the old values stay",
            needs.join(", ")
        );
    }
    labels
}

/// The settings of `fresh` that differ from the running ones and that a reload does not apply, by
/// config key.
fn restart_only_changes(now: &WorkerSettings, fresh: &WorkerSettings) -> Vec<String> {
    let same_trust = match (&now.trust, &fresh.trust) {
        (Trust::Unset, Trust::Unset) => true,
        (Trust::Pin(a), Trust::Pin(b)) => a == b,
        (Trust::Ca(a), Trust::Ca(b)) => a == b,
        _ => false,
    };
    [
        ("url", now.url != fresh.url),
        ("id", now.id != fresh.id),
        ("token", now.token.expose() != fresh.token.expose()),
        ("capacity", now.capacity != fresh.capacity),
        ("tls (pin, ca)", !same_trust),
        ("client certificate (cert, key)", now.identity != fresh.identity),
        ("spool_dir", now.spool_dir != fresh.spool_dir),
        ("spool_max_mb", now.spool_max_bytes != fresh.spool_max_bytes),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| name.to_owned())
    .collect()
}

/// The masks of `settings`, logging what cannot be masked.
pub(super) fn masks_of(settings: &WorkerSettings) -> Result<Masks> {
    let (masks, warnings) = settings.masks().map_err(Error::Usage)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(masks)
}

/// After the hub deleted this worker's registration: removes it from the config file it came from.
pub(super) fn forget_registration(s: &WorkerSettings, reason: &str) {
    match &s.source {
        Some(path) => match cla_config::save::remove_registration(path, &s.id) {
            Ok(true) => tracing::warn!(
                "registration {} removed from {} ({reason}); register again with `cla-worker register`",
                s.id,
                path.display()
            ),
            Ok(false) => tracing::warn!("registration {} was not in {} ({reason})", s.id, path.display()),
            Err(e) => tracing::error!(
                "could not remove registration {} from {}: {e}",
                s.id,
                path.display()
            ),
        },
        None => tracing::warn!(
            "registration {} deleted by the hub ({reason}); it came from flags, not a config file",
            s.id
        ),
    }
}

/// A new token from the hub (`cla-hub worker rotate`): saved into the config file the old one came from,
/// then used for every later connection. If it cannot be saved, the old token stays (the hub undoes the
/// rotation when told so).
pub(super) fn save_rotated_token(s: &mut WorkerSettings, token: cla_common::secret::Secret) -> WorkerMessage {
    let result = match &s.token_file {
        None => Err(
            "its token was given with --token or CLA_WORKER_TOKEN, not read from a config file: \
                     register with --save, or rotate by registering again"
                .to_owned(),
        ),
        Some(path) => cla_config::save::replace_token(path, &s.id, &token)
            .map(|()| path.display().to_string())
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(place) => {
            tracing::info!("the hub rotated this worker's token: the new one is saved in {place}");
            s.token = token;
            WorkerMessage::Rotated {
                saved: true,
                message: place,
            }
        }
        Err(why) => {
            tracing::warn!("the hub sent a new token, which cannot be saved: {why}; keeping the old one");
            WorkerMessage::Rotated {
                saved: false,
                message: why,
            }
        }
    }
}

impl<'w> Live<'w> {
    /// Stops taking jobs: tells the hub, the status file, and closes the tracker (so it can run empty).
    pub(super) async fn start_draining(&mut self) {
        self.send(WorkerMessage::Draining).await;
        self.reporter.state(ConnState::Draining, None);
        self.worker.tracker.close();
    }
}
