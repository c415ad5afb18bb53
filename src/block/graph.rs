//! The block graph, owned by the control plane.
//!
//! Every change goes through [`Graph::begin_change`] and
//! [`Graph::finish_change`] (or [`Graph::change`], both at once): the
//! change is made on a copy (nodes are cheap to copy, their drivers are
//! shared `Arc`s), the copy is checked — no cycles, permissions compatible
//! on every edge — the affected data-plane users are drained, image locks
//! are taken, and only then does the copy replace the graph. A failure
//! leaves the live graph as it was, so there is nothing to undo.

mod change;

pub use change::{PendingChange, Progress, DRAIN_TIMEOUT};

use super::drain::RootSlot;
use super::driver::{ChildRole, Driver, NodeFlags};
use super::error::BlockError;
use super::perm::Perm;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The longest node name QEMU accepts.
const MAX_NODE_NAME: usize = 31;

/// A child edge of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub role: ChildRole,
    pub child: String,
}

#[derive(Clone)]
pub struct Node {
    pub name: String,
    /// Added by blockdev-add or --blockdev at the top level (not an inline
    /// child): only such nodes can be deleted by blockdev-del.
    pub monitor_owned: bool,
    pub driver: Arc<dyn Driver>,
    /// What parents and users send requests to: the driver's data face,
    /// wrapped by node-level policies (detect-zeroes).
    pub io: super::drain::Root,
    pub flags: NodeFlags,
    pub children: Vec<Edge>,
    /// The node's write threshold, which its face checks.
    pub threshold: Arc<super::face::WriteThreshold>,
}

/// Who holds a node from outside the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserKind {
    /// A BlockBackend: an export's, named by the export id.
    BlockDevice,
    /// A command that needs the node for a moment (block_resize).
    Command,
}

/// A root edge: something outside the graph that uses a node.
#[derive(Clone)]
pub struct Use {
    pub id: u64,
    pub kind: UserKind,
    pub name: String,
    pub node: String,
    pub perm: Perm,
    pub shared: Perm,
    /// Where the data plane finds its root, if the user does I/O.
    pub slot: Option<Arc<RootSlot>>,
}

impl Use {
    fn describe(&self) -> String {
        match self.kind {
            UserKind::BlockDevice => format!("block device '{}'", self.name),
            UserKind::Command => format!("command '{}'", self.name),
        }
    }
}

/// The permissions a node ends up with after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePerm {
    pub perm: Perm,
    pub shared: Perm,
}

#[derive(Clone, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    uses: Vec<Use>,
    next_auto_name: u64,
    next_use: u64,
    perms: HashMap<String, NodePerm>,
    /// Edges a draft re-pointed (parent, role): their data-plane links
    /// follow when the change is committed.
    relinks: Vec<(String, ChildRole)>,
    /// Throttle groups by object id (`--object throttle-group`), which
    /// throttle nodes join when opened.
    pub throttle_groups: HashMap<String, Arc<crate::block::throttle::shared::SharedGroup>>,
    /// Changes committed so far: a pending change commits only onto the
    /// graph it was made from.
    commits: u64,
    /// Where nodes opened into the graph report corruption.
    notices: Option<crate::block::notice::Sink>,
}

/// One parent's claim on a node, for the permission check.
struct Claim {
    who: String,
    role: &'static str,
    perm: Perm,
    shared: Perm,
}

impl Graph {
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn uses(&self) -> &[Use] {
        &self.uses
    }

    /// Gives the graph a sink for the notices of the nodes opened from
    /// now on.
    pub fn set_notices(&mut self, sink: crate::block::notice::Sink) {
        self.notices = Some(sink);
    }

    /// The sink a node opened now reports to.
    pub fn notices(&self) -> Option<crate::block::notice::Sink> {
        self.notices.clone()
    }

    /// The block device (export) whose root is `node`, if there is one.
    pub fn device_of(&self, node: &str) -> Option<&str> {
        self.uses
            .iter()
            .find(|u| u.kind == UserKind::BlockDevice && u.node == node)
            .map(|u| u.name.as_str())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node a block device (an export's backend, by its id) uses.
    pub fn device_node(&self, device: &str) -> Option<&str> {
        self.uses
            .iter()
            .find(|u| u.kind == UserKind::BlockDevice && u.name == device)
            .map(|u| u.node.as_str())
    }

    /// The permissions a node holds since the last check.
    pub fn perm_of(&self, name: &str) -> Option<NodePerm> {
        self.perms.get(name).copied()
    }

    /// The data-plane users (by name, with their slots) whose requests
    /// reach `node`.
    pub(crate) fn users_reaching(&self, node: &str) -> Vec<(String, Arc<RootSlot>)> {
        let mut slots: Vec<(String, Arc<RootSlot>)> = Vec::new();
        for u in &self.uses {
            let Some(slot) = &u.slot else { continue };
            if self.below(&u.node).contains(node)
                && !slots.iter().any(|(_, s)| Arc::ptr_eq(s, slot))
            {
                slots.push((u.name.clone(), slot.clone()));
            }
        }
        slots
    }

    /// `name` and every node below it.
    fn below(&self, name: &str) -> HashSet<&str> {
        let mut seen = HashSet::new();
        let mut stack = vec![name];
        while let Some(n) = stack.pop() {
            let Some(node) = self.node(n) else { continue };
            if seen.insert(node.name.as_str()) {
                stack.extend(node.children.iter().map(|e| e.child.as_str()));
            }
        }
        seen
    }

    /// Gives `parent` the child `child` in `role` (adding or changing the
    /// edge). Meant for a draft: the data plane follows when the change
    /// commits.
    pub fn set_child(
        &mut self,
        parent: &str,
        role: ChildRole,
        child: &str,
    ) -> Result<(), BlockError> {
        if self.node(child).is_none() {
            return Err(BlockError::NoSuchNode(child.to_string()));
        }
        let p = self
            .nodes
            .iter_mut()
            .find(|n| n.name == parent)
            .ok_or_else(|| BlockError::NoSuchNode(parent.to_string()))?;
        if p.driver.child(role).is_none() {
            return Err(BlockError::invalid(format!(
                "Node '{parent}' cannot have a '{}' child",
                role.name()
            )));
        }
        match p.children.iter_mut().find(|e| e.role == role) {
            Some(e) => e.child = child.to_string(),
            None => p.children.push(Edge {
                role,
                child: child.to_string(),
            }),
        }
        self.relinks.push((parent.to_string(), role));
        Ok(())
    }

    /// Whether anything (a node or a user) holds `name`.
    /// Whether no node has `name` as a child (users do not count).
    pub fn is_root(&self, name: &str) -> bool {
        self.parents_of(name) == 0
    }

    pub fn has_parents(&self, name: &str) -> bool {
        self.parents_of(name) > 0 || self.uses.iter().any(|u| u.node == name)
    }

    /// Re-points every edge and user that refers to `old` at `new`, except
    /// the edges of `new` itself (an overlay's `backing` stays on `old`).
    /// Meant for a draft: the data plane follows when the change commits.
    pub fn replace_node(&mut self, old: &str, new: &str) -> Result<(), BlockError> {
        for name in [old, new] {
            if self.node(name).is_none() {
                return Err(BlockError::NoSuchNode(name.to_string()));
            }
        }
        let mut relinks = Vec::new();
        for n in self.nodes.iter_mut().filter(|n| n.name != new) {
            for e in n.children.iter_mut().filter(|e| e.child == old) {
                if n.driver.child(e.role).is_none() {
                    return Err(BlockError::invalid(format!(
                        "Node '{}' cannot change its '{}' child",
                        n.name,
                        e.role.name()
                    )));
                }
                e.child = new.to_string();
                relinks.push((n.name.clone(), e.role));
            }
        }
        self.relinks.extend(relinks);
        for u in self.uses.iter_mut().filter(|u| u.node == old) {
            u.node = new.to_string();
        }
        Ok(())
    }

    /// Lets every node re-read lengths it keeps in memory (after a resize).
    pub fn refresh_lengths(&self) {
        // Children first, so parents see their children's new sizes.
        for n in self.nodes.iter() {
            n.io.refresh_length();
        }
    }

    /// A name QEMU would generate: `#block` and a counter, plus two more
    /// digits so that names are not reused across runs by accident.
    pub fn generate_node_name(&mut self) -> String {
        loop {
            self.next_auto_name += 1;
            let salt = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() % 100)
                .unwrap_or(0);
            let name = format!("#block{}{salt:02}", self.next_auto_name);
            if self.node(&name).is_none() {
                return name;
            }
        }
    }

    /// Checks a name given by the user.
    pub fn check_new_name(&self, name: &str) -> Result<(), BlockError> {
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !well_formed {
            return Err(BlockError::BadNodeName(name.to_string()));
        }
        if self
            .uses
            .iter()
            .any(|u| u.kind == UserKind::BlockDevice && u.name == name)
        {
            return Err(BlockError::invalid(format!(
                "node-name={name} is conflicting with a device id"
            )));
        }
        if self.node(name).is_some() {
            return Err(BlockError::DuplicateNode(name.to_string()));
        }
        if name.len() > MAX_NODE_NAME {
            return Err(BlockError::invalid("Node name too long"));
        }
        Ok(())
    }

    pub fn insert(&mut self, node: Node) {
        self.nodes.push(node);
    }

    /// Adds a root edge and returns its id.
    pub fn add_use(&mut self, mut u: Use) -> u64 {
        self.next_use += 1;
        u.id = self.next_use;
        self.uses.push(u);
        self.next_use
    }

    pub fn remove_use(&mut self, id: u64) {
        self.uses.retain(|u| u.id != id);
    }

    /// Removes a node the monitor added, and the inline children only it
    /// used.
    pub fn remove_node(&mut self, name: &str) -> Result<(), BlockError> {
        let node = self
            .node(name)
            .ok_or_else(|| BlockError::NoSuchNode(name.to_string()))?;
        if self.uses.iter().any(|u| u.node == name) {
            return Err(BlockError::NodeInUse(name.to_string()));
        }
        if !node.monitor_owned {
            return Err(BlockError::NotMonitorOwned(name.to_string()));
        }
        if self.parents_of(name) > 0 {
            return Err(BlockError::DeviceInUse(name.to_string()));
        }
        self.remove_subtree(name);
        Ok(())
    }

    fn parents_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| n.children.iter())
            .filter(|e| e.child == name)
            .count()
    }

    fn remove_subtree(&mut self, name: &str) {
        let children: Vec<String> = self
            .node(name)
            .map(|n| n.children.iter().map(|e| e.child.clone()).collect())
            .unwrap_or_default();
        self.nodes.retain(|n| n.name != name);
        for child in children {
            let implicit = self.node(&child).is_some_and(|c| !c.monitor_owned);
            if implicit
                && self.parents_of(&child) == 0
                && !self.uses.iter().any(|u| u.node == child)
            {
                self.remove_subtree(&child);
            }
        }
    }

    /// Nodes in an order where every parent comes before its children.
    fn parents_first(&self) -> Result<Vec<usize>, BlockError> {
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut pending_parents = vec![0usize; self.nodes.len()];
        for n in &self.nodes {
            for e in &n.children {
                let &c = index
                    .get(e.child.as_str())
                    .ok_or_else(|| BlockError::NoSuchNode(e.child.clone()))?;
                pending_parents[c] += 1;
            }
        }
        let mut ready: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| pending_parents[i] == 0)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(i) = ready.pop() {
            order.push(i);
            for e in &self.nodes[i].children {
                if let Some(&c) = index.get(e.child.as_str()) {
                    pending_parents[c] -= 1;
                    if pending_parents[c] == 0 {
                        ready.push(c);
                    }
                }
            }
        }
        if order.len() != self.nodes.len() {
            return Err(BlockError::invalid(
                "The change would create a cycle in the block graph",
            ));
        }
        Ok(order)
    }

    /// Computes the permissions of every node from its parents' claims and
    /// checks that no claim takes what another one does not share.
    pub fn check(&self) -> Result<HashMap<String, NodePerm>, BlockError> {
        // Looked up by name once per edge: a graph of thousands of nodes
        // must not make each change quadratic.
        let names: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let mut claims: HashMap<&str, Vec<Claim>> = HashMap::new();
        for u in &self.uses {
            if !names.contains(u.node.as_str()) {
                return Err(BlockError::NoSuchNode(u.node.clone()));
            }
            claims.entry(u.node.as_str()).or_default().push(Claim {
                who: u.describe(),
                role: "root",
                perm: u.perm,
                shared: u.shared,
            });
        }
        let mut result = HashMap::new();
        for i in self.parents_first()? {
            let node = &self.nodes[i];
            let mine = claims.remove(node.name.as_str()).unwrap_or_default();
            let np = combine(node, &mine)?;
            for e in &node.children {
                let (perm, shared) = node.driver.child_perm(e.role, np.perm, np.shared);
                let Some(&child) = names.get(e.child.as_str()) else {
                    continue;
                };
                claims.entry(child).or_default().push(Claim {
                    who: format!("node '{}'", node.name),
                    role: e.role.name(),
                    perm,
                    shared,
                });
            }
            result.insert(node.name.clone(), np);
        }
        Ok(result)
    }
}

/// The permissions of one node given its parents' claims.
fn combine(node: &Node, claims: &[Claim]) -> Result<NodePerm, BlockError> {
    let shared_of = |c: &Claim| {
        if node.flags.force_share {
            Perm::ALL
        } else {
            c.shared
        }
    };
    for a in claims {
        for b in claims {
            if std::ptr::eq(a, b) {
                continue;
            }
            let denied = a.perm - shared_of(b);
            if !denied.is_empty() {
                return Err(BlockError::PermConflict {
                    node: node.name.clone(),
                    perms: denied.to_string(),
                    wanted_by: format!(
                        "{} (uses node '{}' as '{}' child)",
                        a.who, node.name, a.role
                    ),
                    unshared_by: format!(
                        "{} (uses node '{}' as '{}' child)",
                        b.who, node.name, b.role
                    ),
                });
            }
        }
    }
    let perm = claims.iter().fold(Perm::NONE, |p, c| p | c.perm);
    let shared = claims.iter().fold(Perm::ALL, |s, c| s & shared_of(c));
    if perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && node.driver.is_read_only() {
        return Err(BlockError::ReadOnly);
    }
    Ok(NodePerm { perm, shared })
}
