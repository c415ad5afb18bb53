//! The control loop while a command's graph change waits for its drain:
//! completion, timeout, other sessions served meanwhile, and quit.

use super::*;
use crate::block::drain::{LocalRoot, RootSlot};
use crate::block::driver::ChildRole;
use crate::block::graph::{Use, UserKind};
use crate::block::perm::Perm;
use crate::qmp::session::Body;
use crate::qmp::writer::Writer;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;

/// One monitor session as the control thread sees it: requests go in,
/// replies are read from the client's end.
struct Client {
    id: u64,
    writer: Arc<Writer>,
    replies: BufReader<UnixStream>,
    done_tx: Sender<()>,
    _done_rx: Receiver<()>,
}

impl Client {
    fn new(id: u64) -> Client {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        Client {
            id,
            writer: Writer::spawn(ours, false, format!("test-writer-{id}")).unwrap(),
            replies: BufReader::new(theirs),
            done_tx,
            _done_rx: done_rx,
        }
    }

    fn request(&self, name: &str, args: Value, id: u64) -> ControlMsg {
        ControlMsg::Execute(Box::new(Request {
            session: self.id,
            body: Body::Command {
                name: name.into(),
                args,
            },
            id: Some(json!(id)),
            writer: self.writer.clone(),
            negotiated: Arc::new(AtomicBool::new(true)),
            oob: Arc::new(AtomicBool::new(false)),
            done: self.done_tx.clone(),
        }))
    }

    /// The next reply; panics if none comes within a few seconds.
    fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Whether a reply is there within `wait`.
    fn has_reply(&mut self, wait: Duration) -> bool {
        let timeout = |r: &BufReader<UnixStream>, t| r.get_ref().set_read_timeout(Some(t)).unwrap();
        timeout(&self.replies, wait);
        let got = self
            .replies
            .fill_buf()
            .map(|b| !b.is_empty())
            .unwrap_or(false);
        timeout(&self.replies, Duration::from_secs(5));
        got
    }
}

/// A daemon with null nodes 'n1' and a qcow2 overlay 'ov' (no backing yet),
/// a user 'dev' on 'n1' and one request of it in flight.
fn daemon_with_request_in_flight(dir: &std::path::Path) -> (Daemon, Arc<RootSlot>, LocalRoot) {
    let mut d = Daemon::new();
    let image = dir.join("ov.qcow2");
    let image = image.to_str().unwrap();
    crate::block::driver::qcow2::create::create(image, 1 << 20, None).unwrap();
    for v in [
        json!({"driver": "null-co", "node-name": "n1", "size": 1 << 20}),
        json!({"driver": "qcow2", "node-name": "ov", "backing": null,
               "file": {"driver": "file", "filename": image}}),
    ] {
        let opts: BlockdevOptions = rt::read(&v, rt::Syntax::Json).unwrap();
        d.graph.change(|g| add_node(g, &opts)).unwrap();
    }
    let slot = Arc::new(RootSlot::new(d.graph.node("n1").map(|n| n.io.clone())));
    d.graph
        .change(|g| {
            g.add_use(Use {
                id: 0,
                kind: UserKind::BlockDevice,
                name: "dev".into(),
                node: "n1".into(),
                perm: Perm::CONSISTENT_READ | Perm::WRITE,
                shared: Perm::ALL - Perm::WRITE,
                slot: Some(slot.clone()),
            });
            Ok(())
        })
        .unwrap();
    let mut local = slot.register();
    assert!(local.enter());
    (d, slot, local)
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vubd-daemon-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn snapshot(c: &Client, id: u64) -> ControlMsg {
    c.request(
        "blockdev-snapshot",
        json!({"node": "n1", "overlay": "ov"}),
        id,
    )
}

#[test]
fn a_waiting_change_completes_while_other_sessions_are_served_in_order() {
    // Arrange
    let dir = scratch("complete");
    let (mut d, _slot, mut local) = daemon_with_request_in_flight(&dir);
    let mut a = Client::new(1);
    let mut b = Client::new(2);

    // Act: session 1's snapshot waits; session 2 reads, then changes;
    // session 1 asks again.
    d.handle(snapshot(&a, 1));
    d.progress();
    d.handle(b.request("query-named-block-nodes", json!({}), 2));
    d.handle(b.request(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n3"}),
        3,
    ));
    d.handle(a.request("query-version", json!({}), 4));
    d.progress();

    // Assert: only the query was answered, from the graph as it was.
    let nodes = b.reply();
    assert_eq!(nodes["id"], 2);
    assert_eq!(nodes["return"][0]["node-name"], "ov", "{nodes}");
    assert_eq!(nodes["return"][0]["backing_file_depth"], 0, "{nodes}");
    assert!(!a.has_reply(Duration::from_millis(50)));
    assert!(!b.has_reply(Duration::from_millis(10)));
    assert_eq!(d.graph.uses()[0].node, "n1");
    assert!(!local.enter(), "a new request started during the drain");

    // Act: the request in flight ends.
    local.leave();
    d.progress();

    // Assert: the snapshot committed and was answered, then the waiting
    // commands ran in their order.
    assert_eq!(a.reply(), json!({"return": {}, "id": 1}));
    assert_eq!(a.reply()["id"], 4);
    assert_eq!(b.reply(), json!({"return": {}, "id": 3}));
    assert_eq!(d.graph.uses()[0].node, "ov");
    assert!(d.graph.node("n3").is_some());
    assert!(local.enter());
    assert_eq!(local.root().map(|r| r.length().unwrap()), Some(1 << 20));
    local.leave();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_change_that_waits_too_long_is_given_up() {
    // Arrange
    let dir = scratch("timeout");
    let (mut d, slot, mut local) = daemon_with_request_in_flight(&dir);
    d.drain_timeout = Duration::from_millis(30);
    let mut a = Client::new(1);

    // Act
    d.handle(snapshot(&a, 1));
    d.progress();
    assert!(!a.has_reply(Duration::from_millis(10)));
    std::thread::sleep(Duration::from_millis(40));
    d.progress();

    // Assert: the command failed with the drain error; nothing changed and
    // the user runs again.
    let r = a.reply();
    let desc = r["error"]["desc"].as_str().unwrap().to_string();
    assert!(
        desc.starts_with("Cannot drain 'dev': 1 requests still in flight after"),
        "{r}"
    );
    assert_eq!(d.graph.uses()[0].node, "n1");
    let ov = d.graph.node("ov").unwrap();
    assert!(ov.children.iter().all(|e| e.role != ChildRole::Backing));
    local.leave();
    assert!(local.enter());
    assert!(Arc::ptr_eq(
        local.root().unwrap(),
        &d.graph.node("n1").unwrap().io
    ));
    local.leave();
    assert_eq!(slot.in_flight(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quit_gives_a_waiting_change_up() {
    // Arrange
    let dir = scratch("quit");
    let (mut d, _slot, mut local) = daemon_with_request_in_flight(&dir);
    let mut a = Client::new(1);
    let mut b = Client::new(2);
    d.handle(snapshot(&a, 1));
    d.progress();

    // Act: another session quits while the change waits.
    d.handle(b.request("quit", json!({}), 2));
    d.progress();
    assert!(d.quit);
    d.give_up_waiting("the daemon is shutting down");

    // Assert: quit answered at once; the change abandoned, its command
    // told so, and the user resumed on the old root.
    assert_eq!(b.reply(), json!({"return": {}, "id": 2}));
    let r = a.reply();
    assert_eq!(
        r["error"]["desc"],
        "Graph change abandoned: the daemon is shutting down"
    );
    assert_eq!(d.graph.uses()[0].node, "n1");
    local.leave();
    assert!(local.enter());
    local.leave();
    d.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
