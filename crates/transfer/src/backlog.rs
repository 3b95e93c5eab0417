//! What one end of the hub ↔ worker hop keeps so that a transfer survives a reconnect.
//!
//! Each end of that hop counts the pieces it received from the other (in window units: every piece but
//! `ack`), and keeps a copy of the pieces it sent until the far receiver's `ack` says they were consumed
//! there. After a reconnect each end tells the other what it received (`transfer {op: resume}`), and
//! the other sends again what follows, then its latest `ack`. Acks are cumulative, so only the latest
//! is kept. The copy stays within the flow-control window: a sender never has more than [`WINDOW`]
//! un-acknowledged units in flight.
//!
//! [`WINDOW`]: super::WINDOW

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::Piece;
use cla_protocol::TransferOp;

/// One end of the hub ↔ worker hop of a transfer: its [`Backlog`], and the connection it sends on while
/// there is one. `T` is what that connection's writer takes.
pub struct Hop<T> {
    /// Held while sending, so that what goes out keeps its order (a replay, then new pieces).
    gate: tokio::sync::Mutex<Option<mpsc::Sender<T>>>,
    backlog: Mutex<Backlog>,
}

impl<T> Hop<T> {
    pub fn new(tx: mpsc::Sender<T>) -> Hop<T> {
        Hop {
            gate: tokio::sync::Mutex::new(Some(tx)),
            backlog: Mutex::default(),
        }
    }

    fn backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().expect("backlog lock")
    }

    /// Sends `msg` if connected; a failed send means the connection is gone.
    async fn put(gate: &mut Option<mpsc::Sender<T>>, msg: T) {
        if let Some(tx) = gate.as_ref()
            && tx.send(msg).await.is_err()
        {
            *gate = None;
        }
    }

    /// A piece for the other end: kept, and sent (as `wire(piece)`) if connected.
    pub async fn send(&self, piece: Piece, wire: impl FnOnce(Piece) -> T) {
        let mut gate = self.gate.lock().await;
        self.backlog().outgoing(&piece);
        Self::put(&mut gate, wire(piece)).await;
    }

    /// Sends what `make` returns, if connected, in order with the pieces (`make` runs either way).
    pub async fn send_with(&self, make: impl FnOnce() -> T) {
        let mut gate = self.gate.lock().await;
        let msg = make();
        Self::put(&mut gate, msg).await;
    }

    /// A piece from the other end (see [`Backlog::incoming`]).
    pub fn incoming(&self, piece: &Piece) {
        self.backlog().incoming(piece);
    }

    /// Units received from the other end.
    pub fn received(&self) -> u64 {
        self.backlog().received()
    }

    /// The connection went: what is sent from now on is only kept.
    pub async fn detach(&self) {
        *self.gate.lock().await = None;
    }

    /// After a reconnect, the other end has `received` units: sends what follows, the latest ack, and
    /// then what `then` returns, on `tx`, which the hop uses from now on. Returns how many pieces went
    /// again, or an error when the pieces the other end lacks are no longer kept (the hop is linked
    /// anyway, so that what the caller sends next goes out). A `tx` whose connection is already gone
    /// (a late relink for an earlier connection) changes nothing.
    pub async fn relink(
        &self,
        tx: mpsc::Sender<T>,
        received: u64,
        wire: impl Fn(Piece) -> T,
        then: impl FnOnce() -> Vec<T>,
    ) -> Result<usize, String> {
        let mut gate = self.gate.lock().await;
        if tx.is_closed() {
            return Ok(0);
        }
        let again = self.backlog().replay(received);
        *gate = Some(tx);
        let again = again?;
        let n = again.len();
        for piece in again {
            Self::put(&mut gate, wire(piece)).await;
        }
        for msg in then() {
            Self::put(&mut gate, msg).await;
        }
        Ok(n)
    }
}

#[derive(Debug, Default)]
pub struct Backlog {
    /// Pieces sent and not yet consumed by the far receiver, each with its end position.
    kept: VecDeque<(u64, Piece)>,
    /// Units sent (the end position of the last piece).
    sent: u64,
    /// Units known consumed by the far receiver: nothing before this is kept.
    consumed: u64,
    /// Units received from the other end.
    received: u64,
    /// The latest `ack` sent.
    last_ack: Option<u64>,
}

impl Backlog {
    /// A piece going out to the other end.
    pub fn outgoing(&mut self, piece: &Piece) {
        match piece {
            Piece::Op(TransferOp::Ack { consumed }) => {
                self.last_ack = Some(self.last_ack.unwrap_or(0).max(*consumed));
            }
            Piece::Op(TransferOp::Resume { .. }) => {}
            p => {
                self.sent += p.cost();
                self.kept.push_back((self.sent, p.clone()));
            }
        }
    }

    /// A piece from the other end: an `ack` releases what the far receiver consumed; anything else counts
    /// as received.
    pub fn incoming(&mut self, piece: &Piece) {
        match piece {
            Piece::Op(TransferOp::Ack { consumed }) => {
                self.consumed = self.consumed.max(*consumed);
                while self.kept.front().is_some_and(|(end, _)| *end <= self.consumed) {
                    self.kept.pop_front();
                }
            }
            Piece::Op(TransferOp::Resume { .. }) => {}
            p => self.received += p.cost(),
        }
    }

    /// Units received from the other end (what `resume` says).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Units kept for a resend.
    pub fn kept_units(&self) -> u64 {
        self.sent - self.kept.front().map_or(self.sent, |(end, p)| end - p.cost())
    }

    /// What to send again after the other end said it has `received` units: the pieces past that, then
    /// the latest ack. An error if pieces it lacks were already released (it cannot happen with an honest
    /// peer: a receiver acks only what it had).
    pub fn replay(&self, received: u64) -> Result<Vec<Piece>, String> {
        let first_kept = self.kept.front().map_or(self.sent, |(end, p)| end - p.cost());
        if received < first_kept || received > self.sent {
            return Err(format!(
                "cannot resume the transfer: the other side has {received} units, this side kept {first_kept}..{}",
                self.sent
            ));
        }
        let mut again: Vec<Piece> = self
            .kept
            .iter()
            .filter(|(end, _)| *end > received)
            .map(|(_, p)| p.clone())
            .collect();
        if let Some(consumed) = self.last_ack {
            again.push(Piece::Op(TransferOp::Ack { consumed }));
        }
        Ok(again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FRAME_COST;
    use cla_protocol::Chunk;

    fn data(n: usize) -> Piece {
        Piece::Data(Chunk::new(1, &vec![0u8; n]))
    }

    fn dir() -> Piece {
        Piece::Op(TransferOp::Dir {
            path: "d".into(),
            mode: 0o755,
            mtime_ns: 0,
        })
    }

    #[test]
    fn replays_what_the_other_side_lacks_and_the_latest_ack() {
        let mut b = Backlog::default();
        b.outgoing(&dir()); // ends at 512
        b.outgoing(&data(100)); // ends at 1124
        b.outgoing(&Piece::Op(TransferOp::Ack { consumed: 7 }));
        b.outgoing(&data(10)); // ends at 1646
        assert_eq!(b.kept_units(), 1646);
        let again = b.replay(FRAME_COST).unwrap();
        assert_eq!(again.len(), 3, "two pieces past 512, then the ack");
        assert_eq!(again[0], data(100));
        assert_eq!(again[2], Piece::Op(TransferOp::Ack { consumed: 7 }));
        assert_eq!(b.replay(1646).unwrap().len(), 1, "only the ack");
        assert!(b.replay(1647).is_err(), "more than was sent");
    }

    #[tokio::test]
    async fn a_hop_keeps_what_it_sends_while_cut_off_and_sends_it_in_order_when_relinked() {
        let (tx, mut rx) = mpsc::channel::<Piece>(16);
        let hop = Hop::new(tx);
        hop.send(data(1), |p| p).await;
        assert_eq!(rx.recv().await, Some(data(1)));
        hop.detach().await;
        hop.send(data(2), |p| p).await;
        assert!(rx.try_recv().is_err(), "nothing goes out while detached");

        // The other side has the first piece: the second goes again, then what `then` gives.
        let (tx, mut rx) = mpsc::channel(16);
        let n = hop
            .relink(tx, data(1).cost(), |p| p, || vec![dir()])
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(rx.recv().await, Some(data(2)));
        assert_eq!(rx.recv().await, Some(dir()));
        hop.send(data(3), |p| p).await;
        assert_eq!(rx.recv().await, Some(data(3)), "linked from now on");

        // A connection that went away detaches the hop by itself; nothing was consumed, so a resume
        // from the start sends everything again.
        drop(rx);
        hop.send(data(4), |p| p).await;
        let (tx, mut rx) = mpsc::channel(16);
        assert_eq!(hop.relink(tx, 0, |p| p, Vec::new).await.unwrap(), 4);
        for n in 1..=4 {
            assert_eq!(rx.recv().await, Some(data(n)));
        }
        // The far receiver consumed two pieces: asking for less than that is an error.
        hop.incoming(&Piece::Op(TransferOp::Ack {
            consumed: data(1).cost() + data(2).cost(),
        }));
        let (tx, _rx) = mpsc::channel(16);
        assert!(hop.relink(tx, 0, |p| p, Vec::new).await.is_err());
    }

    #[test]
    fn acks_release_consumed_pieces_and_others_count_as_received() {
        let mut b = Backlog::default();
        b.outgoing(&dir());
        b.outgoing(&data(100));
        b.incoming(&Piece::Op(TransferOp::Ack { consumed: 512 }));
        assert_eq!(b.kept_units(), 612, "the dir was released");
        assert!(b.replay(0).is_err(), "the released dir cannot be sent again");
        assert_eq!(b.replay(512).unwrap(), vec![data(100)]);
        b.incoming(&Piece::Op(TransferOp::Ack { consumed: 10_000 }));
        assert_eq!(b.kept_units(), 0);
        b.incoming(&data(5));
        b.incoming(&Piece::Op(TransferOp::Resume { received: 3 }));
        b.incoming(&dir());
        assert_eq!(b.received(), 5 + 2 * FRAME_COST);
    }
}
