//! Live output to admin clients: forwarding a job's output to its subscribers, and what happens when an
//! exec or transfer client goes away.

use super::*;

/// What a client attaching to a job ([`Hub::attach`]) is sent before the live events.
pub struct Attachment {
    /// Where the output that follows starts, per stream ([`AdminEvent::Attached`](cla_protocol::api::AdminEvent)).
    pub stdout_from: u64,
    pub stderr_from: u64,
    /// Kept output from those positions on: `(stream, bytes)`.
    pub replay: Vec<(u64, Bytes)>,
    /// Where the job is now.
    pub now: JobEvent,
}

/// What to replay of one stream for a client that has `have` bytes of it: `(from, bytes)`. The hub has
/// received `total` bytes and keeps `kept` (the first bytes, up to its cap). Only a whole kept stream
/// replays, so that what follows `from` is contiguous; otherwise the client gets the live bytes from
/// `total` on and learns of the gap from `from`.
fn replay_from(kept: &[u8], total: u64, have: u64) -> (u64, Option<Bytes>) {
    if have < total && kept.len() as u64 == total {
        let bytes = Bytes::copy_from_slice(&kept[have as usize..]);
        return (have, Some(bytes));
    }
    (total, None)
}

/// [`replay_from`] for both streams of a job.
fn replay_both(r: &JobRecord, out: &[u8], err: &[u8], have: (u64, u64)) -> ((u64, u64), Vec<(u64, Bytes)>) {
    let (out_from, out) = replay_from(out, r.stdout_bytes, have.0);
    let (err_from, err) = replay_from(err, r.stderr_bytes, have.1);
    let replay = [(STDOUT_STREAM, out), (STDERR_STREAM, err)]
        .into_iter()
        .filter_map(|(s, b)| b.map(|b| (s, b)))
        .collect();
    ((out_from, err_from), replay)
}

/// Ship and fetch cannot be attached to.
fn refuse_transfer(r: &JobRecord) -> Result<(), ApiFail> {
    if !r.spec.task.is_transfer() {
        return Ok(());
    }
    Err(ApiFail::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!(
            "job {} is a {}: its files move through the client that started it, so it cannot be followed; see `cla-hub job show {}`",
            r.id,
            r.spec.task.verb(),
            r.id
        ),
    ))
}

impl Hub {
    /// Attaches a client to a job it did not create (or lost the stream of): what it has missed from its
    /// offsets on, then the job's live events through `tx`. A job that has ended gets its stored output
    /// and its end. Ship and fetch cannot be attached (their data goes through the client that started
    /// them).
    pub async fn attach(
        &self,
        id: &str,
        have: (u64, u64),
        tx: mpsc::Sender<JobEvent>,
    ) -> Result<Attachment, ApiFail> {
        // A job that just ended leaves memory a moment before its end is written: the store then still
        // shows it running, and a short wait sees the end (bounded: 100 tries of 10 ms).
        for _ in 0..100 {
            if let Some(found) = self.attach_live(id, have, &tx) {
                return found;
            }
            let r = self.store.job(id)?.ok_or_else(|| unknown_job(id))?;
            if r.state.is_terminal() {
                refuse_transfer(&r)?;
                let kept = (r.stdout.clone().into_bytes(), r.stderr.clone().into_bytes());
                let (from, replay) = replay_both(&r, &kept.0, &kept.1, have);
                return Ok(Attachment {
                    stdout_from: from.0,
                    stderr_from: from.1,
                    replay,
                    now: JobEvent::Ended(Box::new(r)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(ApiFail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("job {id} is neither live nor ended in the store: try again"),
        ))
    }

    /// [`Hub::attach`] for a job in memory (`None` if it is not): subscribes `tx` under the state lock,
    /// so that the replay and the live events neither overlap nor leave a hole.
    fn attach_live(
        &self,
        id: &str,
        have: (u64, u64),
        tx: &mpsc::Sender<JobEvent>,
    ) -> Option<Result<Attachment, ApiFail>> {
        let mut guard = self.state();
        let j = guard.jobs.get_mut(id)?;
        if let Err(e) = refuse_transfer(&j.record) {
            return Some(Err(e));
        }
        let (from, replay) = replay_both(&j.record, &j.stdout, &j.stderr, have);
        j.subscribers.push(tx.clone());
        let released = std::mem::take(&mut j.awaiting_client);
        if released {
            j.record.waiting = None;
        }
        let now = match (&j.record.worker, j.record.state) {
            (Some(w), JobState::Running | JobState::Accepted) => JobEvent::Started {
                worker: w.clone(),
                stream: None,
            },
            _ => JobEvent::Waiting(
                j.record
                    .waiting
                    .clone()
                    .unwrap_or_else(|| format!("the job is {}", j.record.state.as_str())),
            ),
        };
        drop(guard);
        if released {
            // Its client is back: it may be offered now.
            self.dispatch_soon();
        }
        Some(Ok(Attachment {
            stdout_from: from.0,
            stderr_from: from.1,
            replay,
            now,
        }))
    }

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

#[cfg(test)]
mod replay_tests {
    use super::replay_from;

    #[test]
    fn a_whole_kept_stream_replays_from_the_clients_offset() {
        let kept = b"hello world";
        let (from, bytes) = replay_from(kept, 11, 6);
        assert_eq!((from, bytes.as_deref()), (6, Some(&b"world"[..])));
        // Nothing missed: the live bytes follow from the end.
        assert_eq!(replay_from(kept, 11, 11), (11, None));
        // A client ahead of a restarted hub: it skips what comes again.
        assert_eq!(replay_from(kept, 11, 20), (11, None));
    }

    #[test]
    fn a_stream_cut_at_the_cap_does_not_replay_and_the_gap_shows() {
        // 11 bytes kept of 50 received: what follows starts at 50, and a client at 3 learns of a gap.
        assert_eq!(replay_from(b"hello world", 50, 3), (50, None));
    }
}
