//! Token rotation (`cla-hub worker rotate ID`).
//!
//! The hub makes the new token only when it can hand it over: at once if the worker is connected, else
//! when it next connects (until then its token is unchanged, so an offline worker loses nothing). On
//! delivery the new token's hash becomes current and the token the worker holds stays valid for the
//! overlap window. The worker saves the new token atomically into the config file that held the old one
//! and answers `rotated`:
//! - saved: the old token stops working at once;
//! - not saved (its token came from a flag or the environment, or the file could not be written): the
//!   rotation is undone and the worker keeps its old token.
//!
//! With no answer (the connection dropped), the rotation stays pending and is delivered again on the next
//! connection, made with whichever token the worker then presents; the old token expires with its window.

use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::oneshot;

use super::jobs::ApiFail;
use super::{Hub, Outbound};
use cla_common::token;
use cla_protocol::{FEATURE_ROTATE, HubMessage};

/// How long `cla-hub worker rotate` waits for a connected worker's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The default overlap window.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(3600);

impl Hub {
    /// Starts a rotation of worker `id`'s token. Returns whether the worker was connected, and a message
    /// saying what happened.
    pub(crate) async fn rotate(&self, id: &str, overlap: Duration) -> Result<(bool, String), ApiFail> {
        self.store
            .update_worker(id, |r| r.rotation = Some(overlap.as_secs().max(1)))?;
        let (tx, rx) = oneshot::channel();
        self.rotations
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), tx);
        if !self.deliver_rotation(id).await? {
            self.rotations.lock().expect("not poisoned").remove(id);
            return Ok((
                false,
                format!(
                    "worker {id} is not connected: it gets a new token when it next connects (its token works unchanged until then)"
                ),
            ));
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(Ok(where_))) => Ok((
                true,
                format!("worker {id} has a new token, saved in {where_}; the old one no longer works"),
            )),
            Ok(Ok(Err(why))) => Err(ApiFail::new(
                StatusCode::CONFLICT,
                "rotate_failed",
                format!(
                    "worker {id} could not save a new token: {why}; the rotation is undone and its token is unchanged"
                ),
            )),
            _ => {
                self.rotations.lock().expect("not poisoned").remove(id);
                Ok((
                    true,
                    format!(
                        "worker {id} was sent a new token but has not confirmed saving it; its old token works for {}s more, and the hub sends a new one again when it reconnects",
                        overlap.as_secs()
                    ),
                ))
            }
        }
    }

    /// Sends a pending rotation to worker `id` if it is connected (and can take one). Returns whether it
    /// was sent.
    pub(crate) async fn deliver_rotation(&self, id: &str) -> Result<bool, ApiFail> {
        let Some(rec) = self.store.worker(id)? else {
            return Ok(false);
        };
        let Some(overlap) = rec.rotation else {
            return Ok(false);
        };
        let (tx, presented_old) = {
            let st = self.state();
            match st.sessions.get(id) {
                Some(s) if s.hello.features.iter().any(|f| f == FEATURE_ROTATE) => {
                    (s.tx.clone(), s.old_token)
                }
                Some(_) => {
                    return Err(ApiFail::new(
                        StatusCode::CONFLICT,
                        "unsupported",
                        format!(
                            "worker {id} runs a cla-worker too old to rotate its token: upgrade it first"
                        ),
                    ));
                }
                None => return Ok(false),
            }
        };
        let fresh = token::generate(token::WORKER_TOKEN_PREFIX);
        let until = cla_common::util::unix_now() + overlap;
        self.store.update_worker(id, |r| {
            // The token the worker holds stays valid for the window: the current one, or, if it connected
            // with the one before (it never saved the last new token), that one, whose window stands.
            if !presented_old {
                r.old_token_hash = Some(std::mem::take(&mut r.token_hash));
                r.old_token_until = Some(until);
            }
            r.token_hash = token::hash(fresh.expose());
        })?;
        tracing::info!(worker = id, "new token sent to the worker");
        let _ = tx
            .send(Outbound::message(HubMessage::Rotate { token: fresh }))
            .await;
        Ok(true)
    }

    /// The worker's answer to `rotate`.
    pub(crate) fn rotated(&self, id: &str, saved: bool, message: String) {
        let result = self.store.update_worker(id, |r| {
            if !saved && let Some(old) = r.old_token_hash.take() {
                // Undo: the worker kept the token it had.
                r.token_hash = old;
            }
            r.old_token_hash = None;
            r.old_token_until = None;
            r.rotation = None;
        });
        if let Err(e) = result {
            tracing::error!(worker = id, "cannot store the end of a token rotation: {e}");
        }
        let mut e = super::guard::AuditEvent::new(if saved {
            "token_rotated"
        } else {
            "token_rotation_failed"
        });
        e.worker = Some(id);
        e.reason = Some(&message);
        self.audit.record(&e);
        if saved {
            tracing::info!(worker = id, "token rotated: saved in {message}");
        } else {
            tracing::warn!(worker = id, "token rotation undone: {message}");
        }
        let waiter = self.rotations.lock().expect("not poisoned").remove(id);
        if let Some(w) = waiter {
            let _ = w.send(if saved { Ok(message) } else { Err(message) });
        }
    }
}

/// What the worker said about a rotation: where it saved the token, or why it could not.
pub(crate) type RotationAnswer = oneshot::Sender<Result<String, String>>;
