//! Server-directed control of workers (`cla-hub worker drain|disable|enable|shutdown|unregister ID`).

use std::time::Duration;

use axum::http::StatusCode;

use super::jobs::ApiFail;
use super::{Hub, Outbound};
use cla_protocol::HubMessage;
use cla_protocol::api::{WorkerAction, WorkerActionDone, WorkerActionRequest};

/// How long an unregistered worker has to leave by itself before its session is closed.
const UNREGISTER_GRACE: Duration = Duration::from_secs(5);

impl Hub {
    /// Applies `action` to worker `id`. Disable and enable are stored (they outlast reconnects and hub
    /// restarts) and apply at once; drain and shutdown need the worker connected; unregister deletes the
    /// registration and tells a connected worker to forget it.
    pub(crate) async fn worker_action(
        &self,
        id: &str,
        action: WorkerAction,
        req: WorkerActionRequest,
    ) -> Result<WorkerActionDone, ApiFail> {
        if self.store.worker(id)?.is_none() {
            return Err(ApiFail::new(
                StatusCode::NOT_FOUND,
                "unknown_worker",
                format!("no worker `{id}` is registered: see `cla-hub workers` for the ids"),
            ));
        }
        let done = |connected: bool, message: String| {
            tracing::info!(worker = id, action = action.as_str(), connected, "{message}");
            Ok(WorkerActionDone {
                id: id.to_owned(),
                action,
                connected,
                message,
            })
        };
        let tx = self.state().sessions.get(id).map(|s| s.tx.clone());
        let not_connected = || {
            ApiFail::new(
                StatusCode::CONFLICT,
                "not_connected",
                format!(
                    "worker {id} is not connected, so it cannot be told to {}; `disable` it to keep jobs away",
                    action.as_str()
                ),
            )
        };
        match action {
            WorkerAction::Disable | WorkerAction::Enable => {
                let disabled = action == WorkerAction::Disable;
                self.store.update_worker(id, |r| r.disabled = disabled)?;
                if let Some(s) = self.state().sessions.get_mut(id) {
                    s.disabled = disabled;
                }
                // Waiting jobs may go elsewhere now (or here again), and their reasons change.
                self.dispatch().await;
                let message = if disabled {
                    format!(
                        "worker {id} disabled: it gets no new jobs (running ones finish) until `cla-hub worker enable {id}`"
                    )
                } else {
                    format!("worker {id} enabled: it takes jobs again")
                };
                done(tx.is_some(), message)
            }
            WorkerAction::Drain | WorkerAction::Shutdown => {
                let tx = tx.ok_or_else(not_connected)?;
                let (msg, message) = if action == WorkerAction::Drain {
                    (
                        HubMessage::Drain {
                            reason: "drained by an admin".into(),
                        },
                        format!(
                            "worker {id} is draining: it takes no new jobs and exits when its running jobs end"
                        ),
                    )
                } else {
                    (
                        HubMessage::Shutdown {
                            reason: "shut down by an admin".into(),
                        },
                        format!("worker {id} told to shut down (it cancels its jobs and exits with code 10)"),
                    )
                };
                // Either way it takes nothing new from now on.
                if let Some(s) = self.state().sessions.get_mut(id) {
                    s.draining = true;
                }
                let _ = tx.send(Outbound::message(msg)).await;
                // The reasons of jobs waiting for it change.
                self.dispatch().await;
                done(true, message)
            }
            WorkerAction::Rotate => {
                let overlap = req
                    .overlap_secs
                    .map(Duration::from_secs)
                    .unwrap_or(super::rotate::DEFAULT_OVERLAP);
                let (connected, message) = self.rotate(id, overlap).await?;
                done(connected, message)
            }
            WorkerAction::Unregister => {
                self.store.remove_worker(id)?;
                let close = self.state().sessions.get(id).map(|s| s.close.clone());
                if let (Some(tx), Some(close)) = (&tx, close) {
                    let msg = HubMessage::Unregistered {
                        reason: "unregistered by an admin".into(),
                    };
                    let _ = tx.send(Outbound::message(msg)).await;
                    // The worker leaves by itself; an older one that does not is disconnected.
                    tokio::spawn(async move {
                        tokio::time::sleep(UNREGISTER_GRACE).await;
                        close.cancel();
                    });
                }
                self.worker_unregistered(id).await;
                let message = if tx.is_some() {
                    format!("worker {id} unregistered; it removes the registration from its config and exits")
                } else {
                    format!(
                        "worker {id} unregistered (it was not connected; its token no longer works, and its config still names it)"
                    )
                };
                done(tx.is_some(), message)
            }
        }
    }
}
