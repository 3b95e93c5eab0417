//! Networks and processes die: the worker reconnects by itself, the hub notices silent workers, bad
//! frames are answered and survived.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::*;

#[test]
fn worker_reconnects_after_the_hub_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _setup, worker) = hub_with_worker(dir.path(), "w1", "t");
    let addr = hub.addr.clone();
    hub.proc.signal(Signal::SIGKILL);
    hub.proc.kill();
    worker.wait_for_line("reconnecting in", 20);
    std::thread::sleep(Duration::from_millis(300));
    let hub = Hub::start_at(dir.path(), &addr);
    hub.wait_worker_state("w1", "idle", 90);
    let out = hub.run(&["exec", "--worker", "w1", "--", "echo back"]);
    assert_eq!(stdout(&out), "back\n", "{}", stderr(&out));
}

#[test]
fn a_silent_worker_is_marked_offline_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, _setup, worker) = hub_with_worker(dir.path(), "w1", "t");
    worker.signal(Signal::SIGSTOP);
    // Heartbeat is 1 s: 3 missed pings, plus slack for a loaded machine.
    hub.wait_worker_state("w1", "offline", 20);
    assert!(hub.proc.log_text().contains("marking OFFLINE"));
    worker.signal(Signal::SIGCONT);
    hub.wait_worker_state("w1", "idle", 90);
}

#[test]
fn running_job_of_a_vanished_worker_is_lost_not_hung() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start_with(dir.path(), "127.0.0.1:0", &["--lost-after", "1"]);
    let setup = register(&hub, dir.path(), "w1", "t");
    let mut worker = run_worker(&setup, &[]);
    hub.wait_worker_state("w1", "idle", 20);
    let id = hub.detach("w1", &[], "sleep 30");
    hub.wait_job_state(&id, "running", 20);
    worker.kill();
    let out = hub.run(&["job", "show", &id, "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(255));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["state"], "lost");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("did not come back within 1s"),
        "{v}"
    );
}

#[test]
fn malformed_and_unknown_frames_are_answered_not_fatal() {
    use cla_protocol::connection::Incoming;
    use cla_protocol::{ErrorCode, Frame, HubMessage, decode_text};
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "raw", "t");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut w, mut r) = raw_worker(&hub, "raw", &setup.token).await;
        let mut next_text = async || loop {
            match tokio::time::timeout(Duration::from_secs(10), r.read())
                .await
                .unwrap()
                .unwrap()
            {
                Some(Incoming::Frame(Frame::Text(t))) => return decode_text::<HubMessage>(&t).unwrap(),
                Some(_) => continue,
                None => panic!("hub closed the connection"),
            }
        };
        assert!(matches!(next_text().await, HubMessage::Welcome(_)));
        w.send_text(r#"{"type":"teleport","to":"mars"}"#.into())
            .await
            .unwrap();
        assert!(matches!(
            next_text().await,
            HubMessage::Error {
                code: ErrorCode::Unsupported,
                ..
            }
        ));
        w.send_text("{not json".into()).await.unwrap();
        assert!(matches!(
            next_text().await,
            HubMessage::Error {
                code: ErrorCode::Malformed,
                ..
            }
        ));
        w.send_text(r#"{"type":"finished","job":42}"#.into())
            .await
            .unwrap();
        assert!(matches!(
            next_text().await,
            HubMessage::Error {
                code: ErrorCode::Malformed,
                ..
            }
        ));
        w.send_binary(999, b"output for nobody").await.unwrap();
        // Still connected and idle after all that.
        assert_eq!(hub.worker_state("raw").as_deref(), Some("idle"));
        // A worker that does not announce the `transfer` feature (an older build) is never offered a
        // ship or fetch: the job waits for one that can, and says why.
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let o = hub.run(&[
            "ship",
            "--worker",
            "raw",
            "--queue-timeout",
            "0.5",
            file.to_str().unwrap(),
            "/tmp/never",
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("worker raw are too old for ship (no `transfer` feature)"),
            "{}",
            stderr(&o)
        );
        assert!(!std::path::Path::new("/tmp/never").exists());
    });
    assert!(hub.proc.exited().is_none(), "the hub died");
}

/// A peer flooding bad frames, or sending one over the size limit, loses its connection; the hub stays
/// healthy for everyone else.
#[test]
fn a_flood_of_bad_frames_or_an_oversized_frame_closes_the_connection() {
    use cla_protocol::connection::{Incoming, MAX_BAD_FRAMES, MAX_MESSAGE_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let setup = register(&hub, dir.path(), "flood", "t");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let open = || raw_worker(&hub, "flood", &setup.token);
    // Reads until the hub closes the connection; returns how many frames came before.
    let until_closed = |mut r: cla_protocol::ConnectionReader| async move {
        let mut frames = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), r.read()).await {
                Err(_) => panic!("the hub kept the connection open"),
                Ok(Ok(Some(Incoming::Frame(_)))) => frames += 1,
                Ok(Ok(Some(Incoming::Alive))) => {}
                Ok(Ok(None)) | Ok(Err(_)) => return frames,
            }
        }
    };
    rt.block_on(async {
        let (mut w, r) = open().await;
        let reading = tokio::spawn(until_closed(r));
        for i in 0..(MAX_BAD_FRAMES + 50) {
            if w.send_text(format!("{{\"type\":\"junk{i}\"}}")).await.is_err() {
                break;
            }
        }
        let frames = reading.await.unwrap();
        // The welcome, then one error per bad frame up to the limit, and no more.
        assert!(frames <= MAX_BAD_FRAMES as usize + 1, "{frames} frames");
    });
    hub.proc
        .wait_for_line("malformed or unsupported frames within", 10);
    // The session is gone before the same id connects again (else: "already connected").
    hub.proc.wait_for_line("worker disconnected", 10);
    rt.block_on(async {
        let (mut w, r) = open().await;
        let reading = tokio::spawn(until_closed(r));
        let _ = w.send_binary(1, &vec![0u8; MAX_MESSAGE_BYTES + 1024]).await;
        reading.await.unwrap();
    });
    hub.proc.wait_for_line("Message too long", 10);
    // The hub serves everyone else as before.
    let _worker = run_worker(&setup, &[]);
    hub.wait_worker_state("flood", "idle", 20);
    assert_eq!(
        hub.ok(&["exec", "--worker", "flood", "--", "echo", "fine"]),
        "fine\n"
    );
}
