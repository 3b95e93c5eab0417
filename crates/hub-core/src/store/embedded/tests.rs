use super::*;
use cla_protocol::api::JobState;

#[test]
fn records_survive_reopen_and_the_lock_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    let rec = PasskeyRecord {
        prefix: "clapk_ab".into(),
        project: "p".into(),
        created: "t".into(),
        revoked: false,
    };
    s.put_passkey("h1", &rec).unwrap();
    assert!(matches!(RedbStore::open(dir.path()), Err(StoreError::Locked(_))));
    drop(s);
    let s = RedbStore::open(dir.path()).unwrap();
    assert_eq!(s.passkey("h1").unwrap().unwrap().project, "p");
    assert!(s.passkey("nope").unwrap().is_none());
}

fn job(id: &str, state: JobState) -> JobRecord {
    let spec: cla_protocol::api::JobSpec =
        serde_json::from_value(serde_json::json!({"worker": "w", "cmd": "true"})).unwrap();
    let mut r = JobRecord::queued(id.into(), spec, "t".into());
    r.state = state;
    r
}

#[tokio::test]
async fn job_writes_are_read_back_at_once_in_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    // Many writes queued without waiting: every read sees the newest one, committed or not.
    for n in 0..200 {
        let id = format!("j{n:03}");
        for state in [JobState::Queued, JobState::Offered, JobState::Running] {
            drop(s.put_job(&job(&id, state)));
            assert_eq!(s.job(&id).unwrap().unwrap().state, state);
        }
    }
    s.put_job(&job("j000", JobState::Succeeded)).await.unwrap();
    let all = s.jobs().unwrap();
    assert_eq!(all.len(), 200);
    assert_eq!(all[0].state, JobState::Succeeded);
    assert!(all[1..].iter().all(|j| j.state == JobState::Running));
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    // Dropping the store commits what was queued.
    drop(s);
    let s = RedbStore::open(dir.path()).unwrap();
    assert_eq!(s.job("j199").unwrap().unwrap().state, JobState::Running);
    assert_eq!(s.job("j000").unwrap().unwrap().state, JobState::Succeeded);
    assert!(lock_pending(&s.pending).is_empty());
}
