//! The engine end to end over an in-memory link: round trips, flow control, and hostile input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cla_protocol::{Chunk, TransferOp};

use super::*;

/// One end of an in-memory link.
struct MemLink {
    tx: mpsc::UnboundedSender<Piece>,
    rx: mpsc::UnboundedReceiver<Piece>,
}

fn pair() -> (MemLink, MemLink) {
    let (a_tx, a_rx) = mpsc::unbounded_channel();
    let (b_tx, b_rx) = mpsc::unbounded_channel();
    (MemLink { tx: a_tx, rx: b_rx }, MemLink { tx: b_tx, rx: a_rx })
}

impl Link for MemLink {
    async fn send(&mut self, piece: Piece) -> Result<(), String> {
        self.tx.send(piece).map_err(|_| "closed".to_owned())
    }
    async fn recv(&mut self) -> Option<Piece> {
        self.rx.recv().await
    }
}

fn to(dest: &Path) -> Received {
    Received {
        dest: dest.display().to_string(),
        base: None,
        mkdir: true,
        expect_name: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/f.bin"), vec![7u8; CHUNK * 2 + 3]).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    let source = Source::open(src.clone()).await.unwrap();
    assert_eq!(
        (source.files, source.dirs, source.bytes),
        (3, 3, (CHUNK * 2 + 6) as u64)
    );
    let (mut s, mut r) = pair();
    let cancel = CancellationToken::new();
    let dest = d.path().join("out/copy");
    let (sent, got) = tokio::join!(
        send(source, &mut s, &cancel, |_| {}),
        receive(to(&dest), &mut r, &cancel, |_| {})
    );
    let (sent, got) = (sent.unwrap(), got.unwrap());
    assert_eq!(sent.sha256, got.sha256, "both sides agree on the manifest digest");
    assert_eq!(got.files, 3);
    assert_eq!(
        std::fs::read(dest.join("a/b/f.bin")).unwrap(),
        vec![7u8; CHUNK * 2 + 3]
    );
    assert_eq!(std::fs::read(dest.join("top.txt")).unwrap(), b"top");
    assert_eq!(std::fs::read(dest.join("empty")).unwrap(), b"");
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["copy"], "no staging left beside the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_waits_for_acks() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("big");
    std::fs::write(&file, vec![1u8; WINDOW as usize + 4 * CHUNK]).unwrap();
    let source = Source::open(file).await.unwrap();
    let (mut s, mut r) = pair();
    let cancel = CancellationToken::new();
    let sending = tokio::spawn(async move { send(source, &mut s, &CancellationToken::new(), |_| {}).await });
    // Take what comes without acking: the sender must stop at the window.
    let mut seen = 0u64;
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(500), r.recv()).await {
        seen += p.cost();
    }
    assert!(
        seen <= WINDOW,
        "{seen} units in flight without an ack (window {WINDOW})"
    );
    assert!(!sending.is_finished());
    // An ack opens the window again, and the rest arrives.
    r.send(Piece::Op(TransferOp::Ack { consumed: seen }))
        .await
        .unwrap();
    let more = tokio::time::timeout(Duration::from_secs(10), r.recv())
        .await
        .unwrap();
    assert!(more.is_some());
    cancel.cancel();
    sending.abort();
}

/// Feeds hand-made pieces to a receiver; returns its error.
async fn receive_pieces(dest: &Path, pieces: Vec<Piece>, pieces_fail: bool) -> TransferError {
    let (s, mut r) = pair();
    let MemLink {
        tx,
        rx: mut from_receiver,
    } = s;
    for p in pieces {
        tx.send(p).unwrap();
    }
    // Without `end`, a receiver can only finish by failing on what it got, or when the sender is gone.
    let went_away = !pieces_fail;
    let _keep = (!went_away).then_some(tx);
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        receive(to(dest), &mut r, &CancellationToken::new(), |_| {}),
    )
    .await
    .expect("the receiver ends");
    // The sender, if it is still there to hear it, is told why.
    let err = got.unwrap_err();
    if !went_away {
        assert!(
            matches!(from_receiver.try_recv(), Ok(Piece::Op(TransferOp::Abort { .. }))),
            "{err}"
        );
    }
    err
}

fn dir(path: &str) -> Piece {
    Piece::Op(TransferOp::Dir {
        path: path.into(),
        mode: 0o755,
        mtime_ns: 0,
    })
}

fn file(path: &str, size: u64) -> Piece {
    Piece::Op(TransferOp::File {
        path: path.into(),
        size,
        mode: 0o644,
        mtime_ns: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_refused_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("new/dest");
    let cases: Vec<(Vec<Piece>, &str)> = vec![
        (vec![dir("d"), file("d/../escape", 1)], "refused entry path"),
        (vec![dir("d"), file("/etc/passwd", 1)], "refused entry path"),
        (vec![dir("d"), file("other/x", 1)], "outside the transfer's root"),
        (
            vec![
                dir("d"),
                Piece::Op(TransferOp::Symlink {
                    path: "d/l".into(),
                    target: "/tmp".into(),
                }),
                file("d/l/x", 1),
            ],
            "comes before its directory",
        ),
        (vec![dir("d"), Piece::Data(Chunk::new(0, b"x"))], "outside a file"),
        (
            vec![dir("d"), file("d/f", 1), Piece::Data(Chunk::new(0, b"xy"))],
            "more bytes than",
        ),
        (
            vec![
                dir("d"),
                file("d/f", 1),
                Piece::Data(Chunk::new(0, b"x")),
                Piece::Op(TransferOp::FileEnd {
                    sha256: "00".repeat(32),
                }),
            ],
            "checksum mismatch",
        ),
        (vec![dir("d"), file("d/f", 0)], "went away"),
    ];
    for (pieces, expected) in cases {
        let err = receive_pieces(&dest, pieces, expected != "went away")
            .await
            .to_string();
        assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
        assert!(
            !d.path().join("new").exists(),
            "{expected}: the created parent was not removed"
        );
        assert!(!d.path().join("escape").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_never_replaces_a_directory_with_a_file() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("dest");
    std::fs::create_dir_all(dest.join("x")).unwrap();
    std::fs::write(dest.join("keep"), b"old").unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"a file where a directory is").unwrap();
    std::fs::write(src.join("keep"), b"new").unwrap();
    let source = Source::open(src).await.unwrap();
    let (mut s, mut r) = pair();
    let c = CancellationToken::new();
    let (_, got) = tokio::join!(
        send(source, &mut s, &c, |_| {}),
        receive(to(&dest), &mut r, &c, |_| {})
    );
    assert!(got.unwrap_err().to_string().contains("is a directory"));
    assert_eq!(
        std::fs::read(dest.join("keep")).unwrap(),
        b"old",
        "nothing changed"
    );
    assert!(dest.join("x").is_dir());
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_choose_another_root_name() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join(".ssh");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("authorized_keys"), b"evil").unwrap();
    let source = Source::open(src).await.unwrap();
    let (mut s, mut r) = pair();
    let c = CancellationToken::new();
    let home = d.path().join("home");
    let mut want = to(&PathBuf::from(format!("{}/", home.display())));
    want.expect_name = Some("app".into());
    let (_, got) = tokio::join!(
        send(source, &mut s, &c, |_| {}),
        receive(want, &mut r, &c, |_| {})
    );
    assert!(got.unwrap_err().to_string().contains("but `app` was asked for"));
    assert!(!home.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_from_a_windows_path_expects_its_last_component() {
    // The hub fetching `Z:\\releases\\app.tar` from a Windows worker: the root comes named `app.tar`.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("app.tar");
    std::fs::write(&src, b"tar").unwrap();
    let source = Source::open(src).await.unwrap();
    let (mut s, mut r) = pair();
    let c = CancellationToken::new();
    let back = d.path().join("back");
    let mut want = to(&PathBuf::from(format!("{}/", back.display())));
    want.expect_name = Some(r"Z:\releases\app.tar".into());
    let (sent, got) = tokio::join!(
        send(source, &mut s, &c, |_| {}),
        receive(want, &mut r, &c, |_| {})
    );
    sent.unwrap();
    got.unwrap();
    assert_eq!(std::fs::read(back.join("app.tar")).unwrap(), b"tar");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_goes_through_a_linked_destination_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("releases/7");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::set_permissions(&release, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(release.join("old"), b"old").unwrap();
    std::os::unix::fs::symlink(&release, d.path().join("current")).unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/new"), b"new").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)).unwrap();
    let source = Source::open(src).await.unwrap();
    let (mut s, mut r) = pair();
    let c = CancellationToken::new();
    let (_, got) = tokio::join!(
        send(source, &mut s, &c, |_| {}),
        receive(to(&d.path().join("current")), &mut r, &c, |_| {})
    );
    got.unwrap();
    assert_eq!(std::fs::read(release.join("sub/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(release.join("old")).unwrap(), b"old");
    assert!(d.path().join("current").is_symlink(), "the link is kept");
    let mode = std::fs::metadata(&release).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750, "an existing destination keeps its mode");
    let names: Vec<_> = std::fs::read_dir(&release)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "no staging left inside: {names:?}");
}

/// Sends `src` (a directory holding a large `a.bin` and a small `z.txt`), swapping `z.txt` with `swap`
/// after planning (the reader is held up on `a.bin` meanwhile); the sender's error. Bounded: a blocked
/// reader fails the test instead of hanging it.
#[cfg(unix)]
async fn send_with_swapped_entry(swap: impl FnOnce(&Path)) -> String {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), vec![3u8; 8 * CHUNK]).unwrap();
    std::fs::write(src.join("z.txt"), b"planned").unwrap();
    let source = Source::open(src.clone()).await.unwrap();
    std::fs::remove_file(src.join("z.txt")).unwrap();
    swap(&src.join("z.txt"));
    let (mut s, mut r) = pair();
    let cancel = CancellationToken::new();
    let dest = d.path().join("out");
    let both = async {
        tokio::join!(
            send(source, &mut s, &cancel, |_| {}),
            receive(to(&dest), &mut r, &cancel, |_| {})
        )
    };
    let (sent, _) = tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .expect("the transfer ends instead of blocking on the swapped entry");
    sent.unwrap_err().to_string()
}

/// Defect: a file swapped for a FIFO after planning made the reader thread block forever in `open()`.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_swapped_in_after_planning_is_refused_not_waited_on() {
    let err =
        send_with_swapped_entry(|p| nix::unistd::mkfifo(p, nix::sys::stat::Mode::S_IRWXU).unwrap()).await;
    assert!(
        err.contains("z.txt: the file was replaced by something that is not a regular file"),
        "{err}"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_swapped_in_after_planning_is_not_followed() {
    let err = send_with_swapped_entry(|p| std::os::unix::fs::symlink("/etc/hostname", p).unwrap()).await;
    assert!(
        err.contains("z.txt: the file was replaced by a symbolic link"),
        "{err}"
    );
}

/// Defect: a size-0 pseudo file (`/proc/...`) failed with "the file changed ...; send it again".
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pseudo_file_says_what_it_is() {
    let d = tempfile::tempdir().unwrap();
    let source = Source::open(PathBuf::from("/proc/self/status")).await.unwrap();
    let (mut s, mut r) = pair();
    let cancel = CancellationToken::new();
    let (sent, _) = tokio::join!(
        send(source, &mut s, &cancel, |_| {}),
        receive(to(&d.path().join("status")), &mut r, &cancel, |_| {})
    );
    let err = sent.unwrap_err().to_string();
    assert!(
        err.contains("a pseudo file (as in /proc or /sys)") && err.contains("copy it to a regular file"),
        "{err}"
    );
}
