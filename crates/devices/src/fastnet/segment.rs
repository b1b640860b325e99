//! The memory a fastnet segment lives in: the [`Memory`] the rings use (aligned atomic words,
//! byte copies, every access bounds-checked) and [`Segment`], a shared mapping of a file (the
//! host's file in /dev/shm, the guest's ivshmem BAR) or a heap allocation for tests.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::ring::DATA_OFFSET;

/// Payloads up to this many bytes are written with word stores rather than memcpy.
const SMALL_COPY: usize = 128;

/// Shared memory as the rings see it: aligned word loads and stores with an ordering, and byte
/// copies. Offsets always come from validated values; implementations still check them, so that
/// a bug here can never touch memory outside the segment.
pub trait Memory {
    /// The segment's size in bytes.
    fn size(&self) -> usize;
    /// Loads the 4-byte-aligned little-endian `u32` at `off`.
    fn load_u32(&self, off: usize, order: Ordering) -> u32;
    /// Loads the 8-byte-aligned little-endian `u64` at `off`.
    fn load_u64(&self, off: usize, order: Ordering) -> u64;
    /// Stores a `u32` at the 4-byte-aligned `off`.
    fn store_u32(&self, off: usize, value: u32, order: Ordering);
    /// Stores a `u64` at the 8-byte-aligned `off`.
    fn store_u64(&self, off: usize, value: u64, order: Ordering);
    /// Hints that the bytes at `off` will be read soon (a cache prefetch; no access, no
    /// effect on what is read). Offsets outside the segment are ignored.
    #[inline]
    fn prefetch(&self, _off: usize) {}
    /// Copies `dst.len()` bytes at `off` out of the segment.
    fn read(&self, off: usize, dst: &mut [u8]);
    /// Copies `src` into the segment at `off`.
    fn write(&self, off: usize, src: &[u8]);
    /// Fills up to `len` bytes at `off` with one read(2) of `fd` (a TAP: one frame) and returns
    /// how many bytes it read. This default reads into a buffer and copies that in; a
    /// [`Segment`] has the kernel read straight into the segment.
    fn read_from_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut buf = vec![0; len];
        let n = rustix::io::read(fd, &mut buf)?;
        self.write(off, &buf[..n]);
        Ok(n)
    }
    /// Writes the `len` bytes at `off` to `fd` with one write(2) (a TAP: one frame) and returns
    /// how many bytes it wrote. This default copies them out first; a [`Segment`] has the
    /// kernel read them straight from the segment, so a peer writing them meanwhile changes
    /// what goes out: only for a trusted peer's bytes (the guest's end).
    fn write_to_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut buf = vec![0; len];
        self.read(off, &mut buf);
        Ok(rustix::io::write(fd, &buf)?)
    }
}

/// A reference or an `Arc` to memory is memory (both ends of a ring share one segment).
impl<T> Memory for T
where
    T: std::ops::Deref,
    T::Target: Memory,
{
    #[inline]
    fn size(&self) -> usize {
        (**self).size()
    }
    #[inline]
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        (**self).load_u32(off, order)
    }
    #[inline]
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        (**self).load_u64(off, order)
    }
    #[inline]
    fn store_u32(&self, off: usize, value: u32, order: Ordering) {
        (**self).store_u32(off, value, order)
    }
    #[inline]
    fn store_u64(&self, off: usize, value: u64, order: Ordering) {
        (**self).store_u64(off, value, order)
    }
    #[inline]
    fn read(&self, off: usize, dst: &mut [u8]) {
        (**self).read(off, dst)
    }
    #[inline]
    fn write(&self, off: usize, src: &[u8]) {
        (**self).write(off, src)
    }
    #[inline]
    fn prefetch(&self, off: usize) {
        (**self).prefetch(off)
    }
    fn read_from_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        (**self).read_from_fd(off, len, fd)
    }
    fn write_to_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        (**self).write_to_fd(off, len, fd)
    }
}

/// Memory shared with another thread or process: a mapping (a file in /dev/shm, an ivshmem
/// BAR) or, for tests and benchmarks, a page-aligned heap allocation.
pub struct Segment {
    ptr: *mut u8,
    size: usize,
    owner: Owner,
}

enum Owner {
    Heap(std::alloc::Layout),
    Mapping,
}

// SAFETY: the segment is plain memory touched only through atomics and raw copies; nothing in it
// is tied to the thread that created it.
unsafe impl Send for Segment {}
// SAFETY: shared access goes through atomic loads and stores or raw byte copies, never through
// references to the bytes, so concurrent use from several threads is what the type is for.
unsafe impl Sync for Segment {}

impl Segment {
    /// A zeroed, page-aligned heap segment of `size` bytes (tests, benchmarks, fuzzing).
    pub fn heap(size: usize) -> Segment {
        let layout = std::alloc::Layout::from_size_align(size.max(8), 4096)
            .expect("segment size fits a layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Segment {
            ptr,
            size,
            owner: Owner::Heap(layout),
        }
    }

    /// Creates the file at `path` with `size` zero bytes, or opens it if it exists with that
    /// size, and maps it shared: the host's segment, a file in /dev/shm that QEMU's
    /// `memory-backend-file,share=on` maps too (whichever of the two starts first creates it;
    /// it is never truncated, which would pull pages from under the other's mapping). Mode
    /// 0600: only vstreamd and the VMM's user (the same) reach it.
    pub fn create_file(path: &std::path::Path, size: u64) -> std::io::Result<Segment> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        match file.metadata()?.len() {
            0 => file.set_len(size)?,
            n if n == size => {}
            n => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} has {n} bytes, the segment is configured with {size}",
                        path.display()
                    ),
                ))
            }
        }
        Segment::map(&file, size)
    }

    /// Maps the whole of an existing file shared: the guest's `resource2` of the ivshmem PCI
    /// device (the BAR's size is the file's size), or the host's segment file again.
    pub fn open_file(path: &std::path::Path) -> std::io::Result<Segment> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Segment::map(&file, size)
    }

    fn map(file: &std::fs::File, size: u64) -> std::io::Result<Segment> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&n| n >= DATA_OFFSET)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a segment of {size} bytes cannot hold the layout"),
                )
            })?;
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        // SAFETY: a new shared mapping at an address the kernel picks, of a file opened
        // read-write; it aliases no Rust object. The segment owns it and unmaps it once.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                file,
                0,
            )
        }?;
        Ok(Segment {
            ptr: ptr.cast(),
            size: len,
            owner: Owner::Mapping,
        })
    }

    #[inline]
    fn check(&self, off: usize, len: usize, align: usize) {
        if !(off.is_multiple_of(align) && off <= self.size && len <= self.size - off) {
            self.outside(off, len);
        }
    }

    /// The panic of [`Segment::check`], out of line so that the check inlined into every
    /// access stays a compare and a branch.
    #[cold]
    #[inline(never)]
    fn outside(&self, off: usize, len: usize) -> ! {
        panic!(
            "fastnet segment access at {off}+{len} outside {} bytes (a bug, not a peer's fault)",
            self.size
        )
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        match self.owner {
            // SAFETY: allocated in `heap` with this layout, freed once.
            Owner::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr, layout) },
            Owner::Mapping => {
                // SAFETY: `map` made this mapping of `size` bytes and only this segment unmaps
                // it; nothing borrows it past the segment's life (accesses are copies).
                if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.cast(), self.size) } {
                    tracing::warn!("fastnet: munmap of the segment failed: {e}");
                }
            }
        }
    }
}

impl Memory for Segment {
    #[inline]
    fn size(&self) -> usize {
        self.size
    }
    #[inline]
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.check(off, 4, 4);
        // SAFETY: in bounds and 4-aligned (checked; the base is page-aligned); the peer writes
        // the word only atomically or from outside this process, and any value is a valid u32.
        u32::from_le(unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }.load(order))
    }
    #[inline]
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.check(off, 8, 8);
        // SAFETY: as in load_u32, 8-aligned.
        u64::from_le(unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }.load(order))
    }
    #[inline]
    fn store_u32(&self, off: usize, value: u32, order: Ordering) {
        self.check(off, 4, 4);
        // SAFETY: as in load_u32.
        unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }.store(value.to_le(), order)
    }
    #[inline]
    fn store_u64(&self, off: usize, value: u64, order: Ordering) {
        self.check(off, 8, 8);
        // SAFETY: as in load_u64.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }.store(value.to_le(), order)
    }
    #[inline]
    fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the source is inside the segment (checked) and cannot overlap `dst`, a Rust
        // slice. The protocol gives these bytes to this side until it publishes its index; a
        // hostile peer writing them anyway changes only the packet's contents, which are copied
        // before use and never trusted.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) }
    }
    #[inline]
    fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: `off` is inside the segment (checked).
        let dst = unsafe { self.ptr.add(off) };
        if src.len() <= SMALL_COPY && off.is_multiple_of(8) {
            // Word stores, not memcpy: for a small record payload (which starts 8 bytes into
            // its record, so mostly mid-line) glibc's memcpy issues 64-byte vector stores that
            // straddle two cache lines; aligned 8-byte stores never do. 64-byte messages went
            // from about 100 M/s to over 150 M/s through the ring (docs/PERFORMANCE.md, "fastnet
            // ring vs memcpy", run 5). Atomic stores, which LLVM does not fold back into a
            // memcpy call, are plain moves on x86_64.
            let (words, tail) = src.as_chunks::<8>();
            for (i, word) in words.iter().enumerate() {
                // SAFETY: `dst + 8 * i` is inside the checked range and 8-aligned (`off` is,
                // and the base is page-aligned); no Rust reference points at segment bytes.
                let at = unsafe { &*dst.add(8 * i).cast::<AtomicU64>() };
                at.store(u64::from_ne_bytes(*word), Ordering::Relaxed);
            }
            if !tail.is_empty() {
                // SAFETY: as below, for the last `tail.len()` bytes of the checked range.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        tail.as_ptr(),
                        dst.add(src.len() - tail.len()),
                        tail.len(),
                    )
                }
            }
            return;
        }
        // SAFETY: the destination is inside the segment (checked) and owned by this side until
        // it publishes its index; `src` is a Rust slice and cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }
    #[inline]
    fn prefetch(&self, off: usize) {
        #[cfg(target_arch = "x86_64")]
        if off < self.size {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: SSE is part of the x86_64 baseline; a prefetch reads nothing the program
            // sees and cannot fault, and the address is inside the mapping anyway (checked).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.ptr.add(off).cast_const().cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }
    fn read_from_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.check(off, len, 1);
        // libc rather than rustix: rustix (and nix) read only into slices, and a `&mut [u8]`
        // over bytes another process may write at any moment would be unsound.
        // SAFETY: the `len` bytes at `off` are inside the segment (checked) and owned by this
        // side until it publishes its index (as in `write`); no Rust reference points at them,
        // and the kernel writes at most `len` bytes there.
        let n = unsafe { libc::read(fd.as_raw_fd(), self.ptr.add(off).cast(), len) };
        // Negative only on failure, with errno set.
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn write_to_fd(&self, off: usize, len: usize, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.check(off, len, 1);
        // libc for the reason given in read_from_fd: no slice over shared bytes.
        // SAFETY: the `len` bytes at `off` are inside the segment (checked); the kernel only
        // reads them. A peer writing them meanwhile changes the bytes written, nothing else.
        let n = unsafe { libc::write(fd.as_raw_fd(), self.ptr.add(off).cast(), len) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}
