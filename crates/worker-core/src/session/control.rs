//! What the hub and the operator control on a live session: SIGHUP reloads of the config and policy,
//! token rotation (saved to the config file), revocation (forgetting the registration), and draining.

use super::*;

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

/// Applies a reload to the settings; returns the new tags and envs if they changed.
pub(super) fn reload(
    opts: &RunOptions,
    settings: &mut WorkerSettings,
    reporter: &Reporter,
) -> Option<(Vec<String>, Vec<String>)> {
    let f = opts.reload.as_ref()?;
    let fresh = f().map(|fresh| {
        if fresh.policy != settings.policy {
            tracing::info!("SIGHUP: policy reloaded");
            settings.policy = fresh.policy.clone();
        }
        (fresh.tags, fresh.envs)
    });
    match fresh {
        Ok((tags, envs)) if tags != settings.tags || envs != settings.envs => {
            tracing::info!(?tags, ?envs, "SIGHUP: tags/envs reloaded");
            settings.tags = tags.clone();
            settings.envs = envs.clone();
            reporter.update(|s| {
                s.tags = tags.clone();
                s.envs = envs.clone();
            });
            Some((tags, envs))
        }
        Ok(_) => {
            tracing::info!("SIGHUP: config reloaded, tags and envs unchanged");
            None
        }
        Err(e) => {
            tracing::warn!("SIGHUP: config not reloaded: {e}");
            None
        }
    }
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
