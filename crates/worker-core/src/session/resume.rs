//! Resuming after a reconnect: the jobs the hub hands back in `welcome`, replayed from their journals
//! past what the hub has, and transfers relinked to their legs.

use super::*;

impl<'w> Live<'w> {
    /// Takes back the jobs the hub still wants after a reconnect (each replays what the hub missed, in
    /// its own task), and gives up those it does not.
    pub(super) async fn resume(&mut self, wanted: &[Resumed]) {
        let wanted: HashMap<&str, &Resumed> = wanted.iter().map(|r| (r.job.as_str(), r)).collect();
        let mut dropped = Vec::new();
        let mut relinks = Vec::new();
        let mut messages = Vec::new();
        {
            let mut table = self.worker.table.lock().expect("jobs lock");
            table.retain(|id, t| {
                if let Some(r) = wanted.get(id.as_str()) {
                    match &t.keep {
                        Keep::Journal(journal) => {
                            let (journal, r) = (journal.clone(), (*r).clone());
                            let link = Link {
                                out: self.ctx.out.clone(),
                                streams: [r.stdout, r.stderr],
                            };
                            relinks.push(tokio::spawn(async move { journal.relink(link, &r).await }));
                        }
                        // The rest follows the hub's `resume` (see `Live::relink_transfer`).
                        Keep::Leg(leg) => messages.extend(leg.resume_messages()),
                    }
                    return true;
                }
                // The hub ended the job meanwhile (its end stored, cancelled, lost): stop it and forget it.
                if t.ended {
                    tracing::debug!(job = %id, "the hub has this job's end: dropping it");
                } else {
                    tracing::warn!(job = %id, "the hub no longer has this job: stopping it and dropping it");
                }
                t.cancel.cancel();
                dropped.push(t.keep.clone());
                false
            });
        }
        self.relinks = relinks;
        for m in messages {
            let _ = self.ctx.out.send(m).await;
        }
        for k in dropped {
            if let Keep::Journal(j) = k {
                j.remove().await;
            }
        }
        self.reporter.update(|s| s.running = running(&self.worker.table));
    }

    /// The hub resumed a transfer and has `received` units of its pieces: the leg sends what follows,
    /// in its own task (the replay may be up to a window).
    pub(super) fn relink_transfer(&mut self, job: &str, received: u64) {
        let taken = self
            .worker
            .table
            .lock()
            .expect("jobs lock")
            .get(job)
            .map(|t| (t.keep.clone(), t.cancel.clone()));
        let Some((Keep::Leg(leg), cancel)) = taken else {
            tracing::debug!(job, "resume for a transfer not kept here ignored");
            return;
        };
        let out = self.ctx.out.clone();
        self.relinks.push(tokio::spawn(async move {
            if let Err(e) = leg.relink(out, received).await {
                tracing::error!(job = %leg.job, "{e}: cancelling it");
                cancel.cancel();
            }
        }));
    }
}
