use super::*;
use cla_protocol::WorkerMessage;

fn link(streams: [u64; 2]) -> (Link, mpsc::Receiver<Out>) {
    let (out, rx) = mpsc::channel(1024);
    (Link { out, streams }, rx)
}

fn drain(rx: &mut mpsc::Receiver<Out>) -> Vec<Out> {
    let mut v = Vec::new();
    while let Ok(o) = rx.try_recv() {
        v.push(o);
    }
    v
}

fn data(outs: &[Out], stream: u64) -> Vec<u8> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Data(s, d) if *s == stream => Some(d.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[tokio::test]
async fn replays_past_the_offsets_then_goes_on_live() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20, None).unwrap());
    let (l, mut rx) = link([1, 2]);
    let j = Journal::create(&spool, "j1", l);
    j.started(Some(42)).await;
    j.output(Stream::Stdout, Bytes::from_static(b"hello ")).await;
    j.output(Stream::Stderr, Bytes::from_static(b"oops\n")).await;
    j.output(Stream::Stdout, Bytes::from_static(b"world\n")).await;
    assert_eq!(data(&drain(&mut rx), 1), b"hello world\n");
    // The connection goes; more output comes meanwhile.
    j.unlink().await;
    j.output(Stream::Stdout, Bytes::from_static(b"more\n")).await;
    // The hub had 3 bytes of stdout and all of stderr.
    let (l, mut rx) = link([7, 8]);
    let resumed = Resumed {
        job: "j1".into(),
        stdout_offset: 3,
        stderr_offset: 5,
        stdout: 7,
        stderr: 8,
    };
    j.relink(l, &resumed).await;
    let outs = drain(&mut rx);
    assert_eq!(data(&outs, 7), b"lo world\nmore\n");
    assert!(data(&outs, 8).is_empty());
    assert!(outs.iter().any(
        |o| matches!(o, Out::Message(m) if matches!(**m, WorkerMessage::Started { pid: Some(42), .. }))
    ));
    j.output(Stream::Stderr, Bytes::from_static(b"live\n")).await;
    assert_eq!(data(&drain(&mut rx), 8), b"live\n");
    j.finish(JobResult::not_run("j1".into(), Outcome::Succeeded, "x"))
        .await;
    assert!(j.ended().await);
    j.remove().await;
    assert!(!dir.path().join("j1.spool").exists());
    assert_eq!(spool.used.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_restarted_worker_recovers_its_journals_and_ends_the_unfinished_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20, None).unwrap());
        let (l, _rx) = link([1, 2]);
        let done = Journal::create(&spool, "done", l);
        done.output(Stream::Stdout, Bytes::from_static(b"out\n")).await;
        done.finish(JobResult::not_run("done".into(), Outcome::Succeeded, "fine"))
            .await;
        let (l, _rx2) = link([3, 4]);
        let cut = Journal::create(&spool, "cut", l);
        cut.started(None).await;
        cut.output(Stream::Stdout, Bytes::from_static(b"partial\n")).await;
    }
    // A crash mid-record leaves a torn tail.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("cut.spool"))
        .unwrap();
    f.write_all(&[STDOUT, 100, 0, 0, 0, b'x']).unwrap();
    drop(f);

    let spool = Arc::new(Spool::open(dir.path(), 1 << 20, None).unwrap());
    let found = spool.recover();
    assert_eq!(
        found.iter().map(|j| j.job.as_str()).collect::<Vec<_>>(),
        ["cut", "done"]
    );
    for j in &found {
        j.end_if_unfinished("the worker stopped").await;
    }
    let (l, mut rx) = link([5, 6]);
    let cut = &found[0];
    let from = Resumed {
        job: "cut".into(),
        stdout_offset: 0,
        stderr_offset: 0,
        stdout: 5,
        stderr: 6,
    };
    cut.relink(l, &from).await;
    let outs = drain(&mut rx);
    assert_eq!(data(&outs, 5), b"partial\n", "the torn record is dropped");
    let end = outs.iter().find_map(|o| match o {
        Out::Message(m) => match &**m {
            WorkerMessage::Finished(r) => Some(r.clone()),
            _ => None,
        },
        _ => None,
    });
    let end = end.expect("the end is sent");
    assert_eq!(end.outcome, Outcome::Lost);
    // A second lock on the same directory is refused.
    let again = Spool::open(dir.path(), 1 << 20, None);
    assert!(again.is_err_and(|e| e.to_string().contains("in use by another cla-worker")));
}

#[tokio::test]
async fn a_spool_hole_is_reported_as_lost_output_not_filled_with_later_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 300, None).unwrap());
    let (l, _rx) = link([1, 2]);
    let j = Journal::create(&spool, "hole", l);
    j.output(Stream::Stdout, Bytes::from(vec![b'A'; 100])).await;
    j.output(Stream::Stdout, Bytes::from(vec![b'B'; 200])).await; // past the limit
    j.output(Stream::Stdout, Bytes::from(vec![b'C'; 50])).await; // fits, but after a hole
    j.unlink().await;
    let (l, mut rx) = link([3, 4]);
    let from = Resumed {
        job: "hole".into(),
        stdout_offset: 20,
        stderr_offset: 0,
        stdout: 3,
        stderr: 4,
    };
    j.relink(l, &from).await;
    assert_eq!(
        data(&drain(&mut rx), 3),
        vec![b'A'; 80],
        "only the spooled prefix is resent"
    );
    j.finish(JobResult::not_run("hole".into(), Outcome::Succeeded, "done"))
        .await;
    let end = drain(&mut rx)
        .into_iter()
        .find_map(|o| match o {
            Out::Message(m) => match *m {
                WorkerMessage::Finished(r) => Some(r),
                _ => None,
            },
            _ => None,
        })
        .unwrap();
    assert!(end.error.unwrap().contains("250 bytes of output were lost"));
}

#[tokio::test]
async fn an_interrupted_send_is_made_good_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20, None).unwrap());
    let (out, mut rx) = mpsc::channel(1);
    let j = Journal::create(&spool, "slow", Link { out, streams: [1, 2] });
    j.output(Stream::Stdout, Bytes::from_static(b"one ")).await;
    // The channel is full: this send blocks, and its task is stopped mid-send.
    let stopped = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        j.output(Stream::Stdout, Bytes::from_static(b"two ")),
    )
    .await;
    assert!(stopped.is_err());
    let mut got = Vec::new();
    let reader = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            if let Out::Data(_, d) = o {
                got.extend_from_slice(&d);
            }
        }
        got
    });
    j.output(Stream::Stdout, Bytes::from_static(b"three")).await;
    j.finish(JobResult::not_run("slow".into(), Outcome::Succeeded, "x"))
        .await;
    j.remove().await;
    drop(j);
    assert_eq!(reader.await.unwrap(), b"one two three");
}

#[tokio::test]
async fn output_past_the_limit_is_not_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 64, None).unwrap());
    let (l, mut rx) = link([1, 2]);
    let j = Journal::create(&spool, "big", l);
    j.output(Stream::Stdout, Bytes::from(vec![b'a'; 40])).await;
    j.output(Stream::Stdout, Bytes::from(vec![b'b'; 40])).await;
    // Both are sent live; only the first fits the spool.
    assert_eq!(data(&drain(&mut rx), 1).len(), 80);
    assert_eq!(std::fs::metadata(dir.path().join("big.spool")).unwrap().len(), 45);
    // The end is kept regardless of the limit.
    j.finish(JobResult::not_run("big".into(), Outcome::Succeeded, "x"))
        .await;
    assert!(std::fs::metadata(dir.path().join("big.spool")).unwrap().len() > 45);
}
