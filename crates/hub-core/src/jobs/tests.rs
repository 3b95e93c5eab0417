use super::*;
use cla_protocol::api::EvalTask;
use tokio_util::sync::CancellationToken;

fn eval_spec(stash: serde_json::Value) -> JobSpec {
    JobSpec {
        target: Target {
            worker: Some("w".into()),
            tags: vec![],
            env: None,
            queue_timeout_secs: None,
        },
        task: Task::Eval(EvalTask {
            code: "1".into(),
            stash,
        }),
        workdir: None,
        env_vars: Default::default(),
        timeout_secs: None,
        on_disconnect: Default::default(),
    }
}

/// A hub with one connected simulated worker (capacity 1): the hub and the worker's channel.
fn hub_with_session(dir: &std::path::Path) -> (Arc<Hub>, mpsc::Receiver<Outbound>) {
    let store = Box::new(crate::store::RedbStore::open(dir).unwrap());
    let cfg = crate::HubConfig::new(dir.to_path_buf());
    let hub = Hub::new(store, cfg, String::new(), CancellationToken::new(), None);
    let (tx, rx) = mpsc::channel(8);
    let hello = cla_protocol::Hello {
        version: cla_protocol::PROTOCOL_VERSION,
        agent: "test".into(),
        tags: vec![],
        envs: vec![],
        capacity: 1,
        host: "h".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        pid: 1,
        resume: vec![],
        features: vec![],
    };
    let session = Session {
        id: "w".into(),
        session: "s1".into(),
        tx,
        hello,
        connected_since: now_rfc3339(),
        running: Default::default(),
        transfers: Default::default(),
        draining: false,
        disabled: false,
        streams: Default::default(),
        next_stream: 1,
        close: CancellationToken::new(),
        old_token: false,
    };
    hub.state().sessions.insert("w".into(), session);
    (hub, rx)
}

fn exec_spec() -> JobSpec {
    let mut spec = eval_spec(serde_json::Value::Null);
    spec.target.worker = None;
    spec.task = Task::Exec(cla_protocol::CommandLine::Argv {
        argv: vec!["true".into()],
    });
    spec
}

/// A new job that a free worker takes at once is stored with one fsync (its `offered` state), not
/// two; one that has to wait is stored `queued` (one fsync) before the caller hears of it, and its
/// offer later costs one more. Either way the offer goes out only after the write.
#[tokio::test]
async fn a_new_job_costs_one_fsync_before_its_offer() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut rx) = hub_with_session(dir.path());
    let before = hub.store.durable_commits();
    let first = hub.create_job(exec_spec(), None).await.unwrap();
    assert_eq!(first.state, JobState::Offered, "{first:?}");
    assert_eq!(hub.store.durable_commits() - before, 1);
    let stored = hub.store.job(&first.id).unwrap().unwrap();
    assert_eq!(stored.state, JobState::Offered);
    let offer = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(offer, Outbound::Message(m) if matches!(&*m, HubMessage::Exec(r) if r.job == first.id)));

    // The worker is full: the next job waits, stored as queued.
    let before = hub.store.durable_commits();
    let second = hub.create_job(exec_spec(), None).await.unwrap();
    assert_eq!(second.state, JobState::Queued, "{second:?}");
    assert_eq!(hub.store.durable_commits() - before, 1);
    assert_eq!(
        hub.store.job(&second.id).unwrap().unwrap().state,
        JobState::Queued
    );
    assert!(rx.try_recv().is_err(), "nothing is offered to a full worker");
}

#[test]
fn stash_limits() {
    assert!(validate(&eval_spec(serde_json::json!({"a": [1, {"b": 2}]}))).is_ok());
    let mut deep = serde_json::json!(1);
    for _ in 0..70 {
        deep = serde_json::json!({ "a": deep });
    }
    let e = validate(&eval_spec(deep)).unwrap_err();
    assert!(e.1.error.contains("nests deeper than 64"), "{}", e.1.error);
    let big = serde_json::json!({ "s": "x".repeat(MAX_STASH_BYTES) });
    let e = validate(&eval_spec(big)).unwrap_err();
    assert!(e.1.error.contains("bytes of JSON"), "{}", e.1.error);
    let e = validate(&eval_spec(serde_json::json!([1]))).unwrap_err();
    assert!(e.1.error.contains("must be a JSON object"), "{}", e.1.error);
}
