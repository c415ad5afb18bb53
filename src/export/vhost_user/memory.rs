//! Guest memory as the frontend shares it: regions mapped from the file
//! descriptors it sends, published atomically to the I/O threads, and the
//! translation of the frontend's virtual addresses (used for ring
//! addresses) into guest physical addresses.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
    GuestRegionMmap,
};

pub type Mem = GuestMemoryMmap<()>;

/// A connection's memory as the I/O threads see it: the current map,
/// published atomically, and a count of publications, so that a thread can
/// tell with one plain load whether the snapshot it holds is still the
/// newest (loading the map itself takes two locked instructions).
#[derive(Clone)]
pub struct AtomicMem {
    map: GuestMemoryAtomic<Mem>,
    generation: Arc<AtomicU64>,
}

impl AtomicMem {
    fn new(mem: Mem) -> Self {
        AtomicMem {
            map: GuestMemoryAtomic::new(mem),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current map.
    pub fn memory(&self) -> GuestMemoryLoadGuard<Mem> {
        self.map.memory()
    }

    /// Changes with every new map. Read it before [`Self::memory`]: a map
    /// published in between then only makes the next look load it again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mapping a memory region: {0}")]
    Map(String),
    #[error("memory region at guest address {0:#x} overlaps another or is invalid")]
    Insert(u64),
    #[error("no memory region at guest address {0:#x} of size {1:#x}")]
    NotFound(u64, u64),
    #[error("address {0:#x} of the frontend is in no shared region")]
    Unmapped(u64),
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    frontend_va: u64,
    gpa: u64,
    size: u64,
}

/// The guest memory of one connection.
pub struct GuestMem {
    atomic: AtomicMem,
    mappings: Vec<Mapping>,
}

impl Default for GuestMem {
    fn default() -> Self {
        GuestMem {
            atomic: AtomicMem::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
        }
    }
}

impl GuestMem {
    /// The handle I/O threads load snapshots from.
    pub fn atomic(&self) -> AtomicMem {
        self.atomic.clone()
    }

    fn publish(&self, mem: Mem) {
        match self.atomic.map.lock() {
            Ok(guard) => guard.replace(mem),
            Err(poisoned) => poisoned.into_inner().replace(mem),
        }
        self.atomic.generation.fetch_add(1, Ordering::Release);
    }

    fn map(
        region: vm_memory::MmapRegion<()>,
        gpa: u64,
    ) -> Result<Arc<GuestRegionMmap<()>>, MemoryError> {
        GuestRegionMmap::new(region, GuestAddress(gpa))
            .map(Arc::new)
            .ok_or(MemoryError::Insert(gpa))
    }

    /// SET_MEM_TABLE: replaces every region.
    pub fn set_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            let region = r
                .mmap_region::<()>(f)
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            mapped.push(Self::map(region, r.guest_phys_addr)?);
            mappings.push(Mapping {
                frontend_va: r.user_addr,
                gpa: r.guest_phys_addr,
                size: r.memory_size,
            });
        }
        let mem = GuestMemoryMmap::from_arc_regions(mapped)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        self.publish(mem);
        self.mappings = mappings;
        Ok(())
    }

    /// ADD_MEM_REG: one more region.
    pub fn add(&mut self, r: &VhostUserSingleMemoryRegion, file: File) -> Result<(), MemoryError> {
        let region = r
            .mmap_region::<()>(file)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region = Self::map(region, r.guest_phys_addr)?;
        let mem = self
            .atomic
            .memory()
            .insert_region(region)
            .map_err(|_| MemoryError::Insert(r.guest_phys_addr))?;
        self.publish(mem);
        self.mappings.push(Mapping {
            frontend_va: r.user_addr,
            gpa: r.guest_phys_addr,
            size: r.memory_size,
        });
        Ok(())
    }

    /// REM_MEM_REG: the region goes once no request in flight uses it
    /// (requests hold snapshots of the memory they point into).
    pub fn remove(&mut self, r: &VhostUserSingleMemoryRegion) -> Result<(), MemoryError> {
        let (mem, _) = self
            .atomic
            .memory()
            .remove_region(GuestAddress(r.guest_phys_addr), r.memory_size)
            .map_err(|_| MemoryError::NotFound(r.guest_phys_addr, r.memory_size))?;
        self.publish(mem);
        self.mappings
            .retain(|m| !(m.gpa == r.guest_phys_addr && m.size == r.memory_size));
        Ok(())
    }

    /// Translates a frontend virtual address (ring addresses) into a guest
    /// physical address.
    pub fn to_gpa(&self, va: u64) -> Result<u64, MemoryError> {
        self.mappings
            .iter()
            .find(|m| va >= m.frontend_va && va - m.frontend_va < m.size)
            .map(|m| va - m.frontend_va + m.gpa)
            .ok_or(MemoryError::Unmapped(va))
    }
}
