//! Golden JSON of every protocol message: field names and tags are the contract between versions.

use cla_protocol::api::{
    AdminEvent, AdminRequest, EvalTask, FetchTask, JobSpec, RegisterRequest, ShipTask, Target, Task,
};
use cla_protocol::*;
use serde_json::json;

fn golden<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    msg: T,
    expected: serde_json::Value,
) {
    let text = encode_text(&msg);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        expected
    );
    assert_eq!(decode_text::<T>(&text).unwrap(), msg, "round trip");
}

#[test]
fn worker_to_hub() {
    golden(
        WorkerMessage::Hello(Hello {
            version: 1,
            agent: "cla-worker 0.1.0".into(),
            tags: vec!["linux".into()],
            envs: vec!["QA".into()],
            capacity: 2,
            host: "h1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            pid: 42,
            resume: vec![],
            features: vec!["transfer".into()],
        }),
        json!({"type":"hello","version":1,"agent":"cla-worker 0.1.0","tags":["linux"],"envs":["QA"],"capacity":2,
               "host":"h1","os":"linux","arch":"x86_64","pid":42,"resume":[],"features":["transfer"]}),
    );
    golden(
        WorkerMessage::Accepted { job: "j1".into() },
        json!({"type":"accepted","job":"j1"}),
    );
    golden(
        WorkerMessage::Refused {
            job: "j1".into(),
            reason: "draining".into(),
        },
        json!({"type":"refused","job":"j1","reason":"draining"}),
    );
    golden(
        WorkerMessage::Started {
            job: "j1".into(),
            pid: Some(7),
        },
        json!({"type":"started","job":"j1","pid":7}),
    );
    golden(
        WorkerMessage::Finished(JobResult {
            job: "j1".into(),
            outcome: Outcome::TimedOut,
            rc: Some(143),
            signal: Some(15),
            duration_ms: 1000,
            error: Some("timed out after 1s".into()),
            code: None,
            transfer: None,
            output_bytes: Some([12, 0]),
            eval: None,
        }),
        json!({"type":"finished","job":"j1","outcome":"timed_out","rc":143,"signal":15,"duration_ms":1000,
               "error":"timed out after 1s","output_bytes":[12,0]}),
    );
    golden(
        WorkerMessage::Finished(JobResult {
            job: "j".into(),
            outcome: Outcome::Succeeded,
            rc: Some(0),
            signal: None,
            duration_ms: 3,
            error: None,
            code: None,
            transfer: None,
            output_bytes: None,
            eval: None,
        }),
        json!({"type":"finished","job":"j","outcome":"succeeded","rc":0,"duration_ms":3}),
    );
    golden(WorkerMessage::Draining, json!({"type":"draining"}));
    golden(
        WorkerMessage::Rotated {
            saved: true,
            message: "/etc/cla-worker.yml".into(),
        },
        json!({"type":"rotated","saved":true,"message":"/etc/cla-worker.yml"}),
    );
    golden(
        HubMessage::Rotate {
            token: cla_common::secret::Secret::new("clatk_0123"),
        },
        json!({"type":"rotate","token":"clatk_0123"}),
    );
    golden(
        WorkerMessage::Update {
            tags: vec!["a".into()],
            envs: vec![],
        },
        json!({"type":"update","tags":["a"],"envs":[]}),
    );
    golden(
        WorkerMessage::Error {
            code: ErrorCode::Unsupported,
            message: "m".into(),
        },
        json!({"type":"error","code":"unsupported","message":"m"}),
    );
}

#[test]
fn hub_to_worker() {
    golden(
        HubMessage::Welcome(Welcome {
            session: "s1".into(),
            heartbeat_secs: 5,
            limits: Limits { max_frame_bytes: 16 },
            resume: vec![],
        }),
        json!({"type":"welcome","session":"s1","heartbeat_secs":5,"limits":{"max_frame_bytes":16}}),
    );
    golden(
        HubMessage::Welcome(Welcome {
            session: "s2".into(),
            heartbeat_secs: 5,
            limits: Limits { max_frame_bytes: 16 },
            resume: vec![Resumed {
                job: "j1".into(),
                stdout_offset: 10,
                stderr_offset: 0,
                stdout: 7,
                stderr: 8,
            }],
        }),
        json!({"type":"welcome","session":"s2","heartbeat_secs":5,"limits":{"max_frame_bytes":16},
               "resume":[{"job":"j1","stdout_offset":10,"stderr_offset":0,"stdout":7,"stderr":8}]}),
    );
    golden(
        HubMessage::Ack { job: "j1".into() },
        json!({"type":"ack","job":"j1"}),
    );
    golden(
        HubMessage::Reject(Reject {
            code: RejectCode::Duplicate,
            message: "m".into(),
            retry_after: Some(3),
        }),
        json!({"type":"reject","code":"duplicate","message":"m","retry_after":3}),
    );
    golden(
        HubMessage::Reject(Reject {
            code: RejectCode::Unauthorized,
            message: "m".into(),
            retry_after: None,
        }),
        json!({"type":"reject","code":"unauthorized","message":"m"}),
    );
    golden(
        HubMessage::Exec(ExecRequest {
            job: "j1".into(),
            command: CommandLine::Shell {
                cmd: "echo hi".into(),
            },
            workdir: Some("/tmp".into()),
            env: [("K".to_owned(), "V".to_owned())].into(),
            timeout_ms: Some(1500),
            output_timeout_ms: None,
            stdout: 1,
            stderr: 2,
            on_disconnect: OnDisconnect::Continue,
        }),
        json!({"type":"exec","job":"j1","cmd":"echo hi","workdir":"/tmp","env":{"K":"V"},"timeout_ms":1500,"stdout":1,"stderr":2}),
    );
    golden(
        HubMessage::Exec(ExecRequest {
            job: "j2".into(),
            command: CommandLine::Argv {
                argv: vec!["ls".into(), "-l".into()],
            },
            workdir: None,
            env: Default::default(),
            timeout_ms: None,
            output_timeout_ms: Some(10),
            stdout: 3,
            stderr: 4,
            on_disconnect: OnDisconnect::CancelAfter(60),
        }),
        json!({"type":"exec","job":"j2","argv":["ls","-l"],"output_timeout_ms":10,"stdout":3,"stderr":4,
               "on_disconnect":{"cancel_after":60}}),
    );
    golden(
        HubMessage::Cancel {
            job: "j1".into(),
            reason: "r".into(),
        },
        json!({"type":"cancel","job":"j1","reason":"r"}),
    );
    golden(
        HubMessage::Shutdown { reason: "r".into() },
        json!({"type":"shutdown","reason":"r"}),
    );
}

#[test]
fn eval_messages() {
    golden(
        HubMessage::Eval(EvalRequest {
            job: "j3".into(),
            code: "1+1".into(),
            stash: serde_json::json!({"a": 1}),
            timeout_ms: Some(5000),
            stdout: 5,
            on_disconnect: OnDisconnect::Continue,
        }),
        json!({"type":"eval","job":"j3","code":"1+1","stash":{"a":1},"timeout_ms":5000,"stdout":5}),
    );
    golden(
        WorkerMessage::Finished(JobResult {
            job: "j3".into(),
            outcome: Outcome::Failed,
            rc: Some(1),
            signal: None,
            duration_ms: 4,
            error: Some("Error: boom".into()),
            code: None,
            transfer: None,
            output_bytes: None,
            eval: Some(EvalOutput {
                result: json!(null),
                stash: json!({"a": 2}),
                console: vec![ConsoleLine {
                    level: "log".into(),
                    text: "hi".into(),
                }],
                console_truncated: false,
                error: Some(EvalError {
                    message: "Error: boom".into(),
                    stack: vec!["at <main> (unknown at :1:7)".into()],
                }),
            }),
        }),
        json!({"type":"finished","job":"j3","outcome":"failed","rc":1,"duration_ms":4,"error":"Error: boom",
               "eval":{"result":null,"stash":{"a":2},"console":[{"level":"log","text":"hi"}],"console_truncated":false,
                       "error":{"message":"Error: boom","stack":["at <main> (unknown at :1:7)"]}}}),
    );
    golden(
        AdminRequest::Exec(Box::new(JobSpec {
            target: Target {
                worker: Some("w".into()),
                tags: vec![],
                env: None,
                queue_timeout_secs: None,
            },
            task: Task::Eval(EvalTask {
                code: "stash.x".into(),
                stash: json!({"x": 1}),
            }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: None,
            on_disconnect: Default::default(),
        })),
        json!({"type":"exec","worker":"w","code":"stash.x","stash":{"x":1}}),
    );
}

#[test]
fn binary_frames_carry_a_big_endian_stream_id() {
    let f = encode_binary(258, b"xy");
    assert_eq!(&f[..], &[0, 0, 0, 0, 0, 0, 1, 2, b'x', b'y']);
}

#[test]
fn api_bodies() {
    golden(
        AdminRequest::Exec(Box::new(JobSpec {
            target: Target {
                worker: None,
                tags: vec!["java".into()],
                env: Some("QA".into()),
                queue_timeout_secs: Some(30.0),
            },
            task: Task::Exec(CommandLine::Argv {
                argv: vec!["true".into()],
            }),
            workdir: None,
            env_vars: Default::default(),
            on_disconnect: Default::default(),
            timeout_secs: Some(2.5),
        })),
        json!({"type":"exec","tags":["java"],"env":"QA","queue_timeout_secs":30.0,"argv":["true"],"timeout_secs":2.5}),
    );
    golden(AdminRequest::Cancel, json!({"type":"cancel"}));
    golden(
        AdminEvent::Waiting {
            job: "j".into(),
            reason: "all 2 matching workers busy".into(),
        },
        json!({"type":"waiting","job":"j","reason":"all 2 matching workers busy"}),
    );
    // A newer hub's event is ignored, not an error.
    assert_eq!(
        serde_json::from_value::<AdminEvent>(json!({"type":"progress","x":1})).unwrap(),
        AdminEvent::Unknown
    );
    golden(
        AdminEvent::Created { job: "j".into() },
        json!({"type":"created","job":"j"}),
    );
    let reg = RegisterRequest {
        passkey: "p".parse().unwrap(),
        id: None,
        tags: vec![],
        envs: vec![],
        host: Some("h".into()),
        user: None,
        version: None,
        csr: None,
    };
    assert_eq!(
        serde_json::to_value(&reg).unwrap(),
        json!({"passkey":"p","tags":[],"envs":[],"host":"h"})
    );
    let with_csr = RegisterRequest {
        csr: Some("-----BEGIN CERTIFICATE REQUEST-----".into()),
        ..reg
    };
    assert_eq!(
        serde_json::to_value(&with_csr).unwrap()["csr"],
        json!("-----BEGIN CERTIFICATE REQUEST-----")
    );
}

#[test]
fn job_tasks_are_unambiguous() {
    let spec = |body: serde_json::Value| serde_json::from_value::<JobSpec>(body);
    assert!(matches!(
        spec(json!({"worker": "w", "cmd": "ls"})).unwrap().task,
        Task::Exec(CommandLine::Shell { .. })
    ));
    assert!(matches!(
        spec(json!({"worker": "w", "argv": ["ls"]})).unwrap().task,
        Task::Exec(CommandLine::Argv { .. })
    ));
    assert!(matches!(
        spec(json!({"worker": "w", "code": "1"})).unwrap().task,
        Task::Eval(_)
    ));
    for bad in [
        json!({"worker": "w", "code": "1", "argv": ["echo"]}),
        json!({"worker": "w", "code": "1", "cmd": "ls"}),
        json!({"worker": "w", "code": "1", "cmd": 7}),
        json!({"worker": "w", "cmd": "ls", "argv": ["ls"]}),
        json!({"worker": "w", "cmd": "ls", "stash": {}}),
        json!({"worker": "w"}),
    ] {
        assert!(spec(bad.clone()).is_err(), "{bad} was accepted");
    }
    let e = decode_text::<HubMessage>(
        r#"{"type":"exec","job":"j","cmd":"a","argv":["b"],"stdout":1,"stderr":2}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not both"), "{e}");
}

#[test]
fn transfers() {
    golden(
        HubMessage::Ship(ShipRequest {
            job: "j1".into(),
            dest: "/opt/app/".into(),
            mkdir: true,
            stream: 5,
        }),
        json!({"type":"ship","job":"j1","dest":"/opt/app/","mkdir":true,"stream":5}),
    );
    golden(
        HubMessage::Fetch(FetchRequest {
            job: "j1".into(),
            path: "logs".into(),
            stream: 6,
        }),
        json!({"type":"fetch","job":"j1","path":"logs","stream":6}),
    );
    let frames = [
        (
            TransferOp::Begin { files: 2, bytes: 10 },
            json!({"op":"begin","files":2,"bytes":10}),
        ),
        (
            TransferOp::Dir {
                path: "d".into(),
                mode: 0o755,
                mtime_ns: 1,
            },
            json!({"op":"dir","path":"d","mode":493,"mtime_ns":1}),
        ),
        (
            TransferOp::File {
                path: "d/f".into(),
                size: 10,
                mode: 0o644,
                mtime_ns: -5,
            },
            json!({"op":"file","path":"d/f","size":10,"mode":420,"mtime_ns":-5}),
        ),
        (
            TransferOp::FileEnd { sha256: "ab".into() },
            json!({"op":"file_end","sha256":"ab"}),
        ),
        (
            TransferOp::Symlink {
                path: "d/l".into(),
                target: "f".into(),
            },
            json!({"op":"symlink","path":"d/l","target":"f"}),
        ),
        (
            TransferOp::End {
                files: 1,
                bytes: 10,
                sha256: "cd".into(),
            },
            json!({"op":"end","files":1,"bytes":10,"sha256":"cd"}),
        ),
        (
            TransferOp::Ack { consumed: 99 },
            json!({"op":"ack","consumed":99}),
        ),
        (
            TransferOp::Abort {
                error: "disk full".into(),
            },
            json!({"op":"abort","error":"disk full"}),
        ),
        (
            TransferOp::Committed(TransferSummary {
                path: "/x".into(),
                files: 1,
                dirs: 0,
                symlinks: 0,
                skipped: 0,
                bytes: 10,
                sha256: "cd".into(),
            }),
            json!({"op":"committed","path":"/x","files":1,"dirs":0,"symlinks":0,"bytes":10,"sha256":"cd"}),
        ),
        (
            TransferOp::Resume { received: 2048 },
            json!({"op":"resume","received":2048}),
        ),
    ];
    for (op, mut expected) in frames {
        expected["job"] = json!("j1");
        let frame = TransferFrame { job: "j1".into(), op };
        let mut hub = expected.clone();
        hub["type"] = json!("transfer");
        golden(HubMessage::Transfer(frame.clone()), hub.clone());
        golden(WorkerMessage::Transfer(frame.clone()), hub.clone());
        golden(AdminRequest::Transfer(frame.clone()), hub.clone());
        golden(AdminEvent::Transfer(frame), hub);
    }
    golden(
        JobSpec {
            target: Target {
                worker: Some("w1".into()),
                tags: vec![],
                env: None,
                queue_timeout_secs: None,
            },
            task: Task::Ship(ShipTask {
                dest: "/opt/".into(),
                mkdir: false,
                source: Some("dist".into()),
            }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: None,
            on_disconnect: Default::default(),
        },
        json!({"worker":"w1","ship":{"dest":"/opt/","mkdir":false,"source":"dist"}}),
    );
    golden(
        JobSpec {
            target: Target::default(),
            task: Task::Fetch(FetchTask {
                path: "logs".into(),
                dest: None,
            }),
            workdir: None,
            env_vars: Default::default(),
            timeout_secs: None,
            on_disconnect: Default::default(),
        },
        json!({"fetch":{"path":"logs"}}),
    );
    // One task per job.
    let both = r#"{"worker":"w","cmd":"ls","fetch":{"path":"x"}}"#;
    assert!(
        serde_json::from_str::<JobSpec>(both)
            .unwrap_err()
            .to_string()
            .contains("not several")
    );
}
