//! Live output to admin clients: forwarding a job's output to its subscribers, and what happens when an
//! exec or transfer client goes away.

use super::*;

impl Hub {
    /// A binary frame of `worker`'s session: output of a job (kept up to the cap and streamed), or a
    /// fetch's file data (relayed as it is).
    pub(crate) async fn job_output(&self, worker: &str, chunk: Chunk) {
        let cap = self.cfg.max_output_bytes;
        let stream = chunk.stream();
        let (which, subs) = {
            let mut guard = self.state();
            let State { sessions, jobs, .. } = &mut *guard;
            let Some((job_id, which)) = sessions.get(worker).and_then(|s| s.streams.get(&stream)).cloned()
            else {
                tracing::debug!(worker, stream, "output for an unknown stream dropped");
                return;
            };
            let Some(j) = jobs.get_mut(&job_id) else { return };
            // File bytes (TRANSFER_STREAM) are relayed, not kept; the relay counts them for a resume.
            if which == TRANSFER_STREAM {
                if let Some(relay) = &j.relay {
                    relay.incoming(&Piece::Data(chunk.clone()));
                }
            } else {
                let data = chunk.payload();
                if which == STDOUT_STREAM {
                    j.record.stdout_bytes += data.len() as u64;
                } else {
                    j.record.stderr_bytes += data.len() as u64;
                }
                let (buf, truncated) = if which == STDOUT_STREAM {
                    (&mut j.stdout, &mut j.record.stdout_truncated)
                } else {
                    (&mut j.stderr, &mut j.record.stderr_truncated)
                };
                let room = cap.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..room.min(data.len())]);
                if data.len() > room {
                    *truncated = true;
                }
            }
            (which, j.live_subscribers())
        };
        let event = if which == TRANSFER_STREAM {
            JobEvent::Chunk(chunk)
        } else {
            JobEvent::Output {
                stream: which,
                data: chunk.data(),
            }
        };
        for s in subs {
            let _ = s.send(event.clone()).await;
        }
    }

    /// The client streaming a job went away. A transfer cannot go on without it (see
    /// [`Hub::transfer_client_gone`]); any other job goes on if it has started, and is dropped if not
    /// (see [`Hub::stream_client_gone`]).
    pub(crate) async fn client_gone(&self, job: &str) {
        let transfer = self
            .state()
            .jobs
            .get(job)
            .is_some_and(|j| j.record.spec.task.is_transfer());
        if transfer {
            self.transfer_client_gone(job).await;
        } else {
            self.stream_client_gone(job).await;
        }
    }

    /// The client streaming a job went away: a job no worker has started yet is cancelled (its client,
    /// a command or a rulebook step, is no longer there to want it); a started one goes on (`job show`).
    pub(super) async fn stream_client_gone(&self, job: &str) {
        let ended = {
            let mut guard = self.state();
            let st = &mut *guard;
            match st.jobs.get_mut(job).map(|j| (j.record.state, j)) {
                Some((JobState::Queued, _)) => {
                    st.queue.retain(|q| q != job);
                    end_job(st, job, |r| {
                        r.state = JobState::Cancelled;
                        r.error = Some("its client went away before it started".into());
                    })
                }
                // Offered: if the worker takes it, it runs (started jobs go on); if it comes back to the
                // queue, it ends there.
                Some((JobState::Offered, j)) => {
                    j.client_gone = true;
                    None
                }
                _ => None,
            }
        };
        if let Some(e) = ended {
            tracing::info!(job, "the job's client went away before it started: cancelled");
            self.deliver(e).await;
        }
    }
}
