//! Hints to the CPU's caches on the request path. A guest's driver runs on
//! another CPU and writes what vubd reads next (ring entries, descriptors,
//! request headers), and reads what vubd writes (status bytes, the used
//! ring), so each of those cache lines has to travel between the CPUs. A
//! prefetch starts such a transfer early, while other work goes on, instead
//! of when the data is needed.
//!
//! Prefetches never fault and change no memory: an address that is stale,
//! or outside any mapping, costs nothing but the hint.

/// Fetches the line holding `p` for reading.
#[inline]
pub fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: PREFETCHT0 is a hint: it neither faults nor dereferences
        // in the sense of the language, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Fetches the line holding `p` for writing (ownership, not only a copy),
/// where the CPU can; otherwise nothing.
#[inline]
pub fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    if has_prefetchw() {
        // SAFETY: PREFETCHW never faults and changes no memory (the
        // address is only a hint to the cache), and the CPU has it.
        unsafe { std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether the CPU has PREFETCHW (CPUID 0x8000_0001, ECX bit 8). A read
/// prefetch would bring the line in shared, and a write would still wait
/// for the other CPU to give it up.
#[cfg(target_arch = "x86_64")]
fn has_prefetchw() -> bool {
    use std::arch::x86_64::__cpuid;
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // Leaf 0x8000_0001 is only read when leaf 0x8000_0000 says it exists.
    *HAS.get_or_init(|| {
        __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
    })
}
