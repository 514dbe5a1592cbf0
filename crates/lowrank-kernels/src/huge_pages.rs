//! Backing model weights with 2 MiB pages.
//!
//! Batch-1 decoding streams every weight once per token; with 4 KiB pages that is a TLB miss
//! and a restart of the hardware prefetcher every 4 KiB. Linux gives anonymous memory huge
//! pages only where asked (`transparent_hugepage/enabled` is usually `madvise`), and candle's
//! weights live in ordinary heap allocations, so once the weights are in memory
//! `MADV_COLLAPSE` (Linux 6.1+) moves the 2 MiB-aligned blocks that hold them onto huge pages
//! in place. Contents do not change; a block the kernel cannot collapse (THP off, no free huge
//! page, a block that crosses into another mapping) stays as it was: a hint only.

use candle_core::{CpuStorage, Storage, Tensor};

const HUGE_PAGE: usize = 2 << 20;

/// Below this many bytes in all, nothing is collapsed: a handful of TLB entries do not matter,
/// and each collapse copies 2 MiB while holding the process's memory-map lock, which stalls
/// every other thread that faults a page meanwhile (the tests' servers, started side by side).
const MIN_BYTES: usize = 16 << 20;

/// Moves the memory of every CPU tensor in `tensors` onto 2 MiB pages where the kernel can,
/// and returns how many bytes it collapsed (0 where the platform has no `MADV_COLLAPSE`, or
/// when the tensors hold less than 16 MiB in all). Neighbouring data in the same blocks is
/// collapsed too, which changes nothing for it.
pub fn back_with_huge_pages(tensors: &[&Tensor]) -> usize {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (storage, _) = t.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            ranges.extend(byte_range(cpu));
        }
    }
    collapse_ranges(&ranges)
}

/// [`back_with_huge_pages`] for buffers of our own rather than tensors' (an adapter pack's
/// factors, a 4-bit weight's codes).
pub fn back_slices_with_huge_pages<T>(slices: &[&[T]]) -> usize {
    let ranges: Vec<(usize, usize)> = slices
        .iter()
        .map(|d| (d.as_ptr() as usize, std::mem::size_of_val(*d)))
        .collect();
    collapse_ranges(&ranges)
}

/// Collapses the 2 MiB blocks that (address, bytes) ranges touch, if they hold 16 MiB or more
/// in all; the bytes collapsed.
fn collapse_ranges(ranges: &[(usize, usize)]) -> usize {
    let mut blocks: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for &(start, len) in ranges.iter().filter(|(_, len)| *len > 0) {
        bytes += len;
        let first = start / HUGE_PAGE;
        let last = (start + len - 1) / HUGE_PAGE;
        blocks.extend(first..=last);
    }
    if bytes < MIN_BYTES {
        return 0;
    }
    blocks.sort_unstable();
    blocks.dedup();
    blocks
        .into_iter()
        .filter(|&b| collapse(b * HUGE_PAGE))
        .count()
        * HUGE_PAGE
}

/// Address and length in bytes of a CPU storage's buffer.
fn byte_range(cpu: &CpuStorage) -> Option<(usize, usize)> {
    fn of<T>(v: &[T]) -> Option<(usize, usize)> {
        Some((v.as_ptr() as usize, std::mem::size_of_val(v)))
    }
    match cpu {
        CpuStorage::F32(v) => of(v),
        CpuStorage::BF16(v) => of(v),
        CpuStorage::F16(v) => of(v),
        CpuStorage::F64(v) => of(v),
        CpuStorage::U8(v) => of(v),
        CpuStorage::U32(v) => of(v),
        CpuStorage::I64(v) => of(v),
        _ => None,
    }
}

/// Collapses the 2 MiB block at `address` onto one huge page; whether the kernel did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn collapse(address: usize) -> bool {
    // SAFETY: MADV_COLLAPSE only changes how the block is mapped, never its contents, and
    // fails without effect on addresses that are not mapped anonymous memory.
    unsafe { libc::madvise(address as *mut libc::c_void, HUGE_PAGE, libc::MADV_COLLAPSE) == 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn collapse(_address: usize) -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The kB of `field` in /proc/self/smaps for the mapping that holds `address`.
    fn smaps_kb(address: usize, field: &str) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&address);
                    continue;
                }
            }
            if inside && line.starts_with(field) {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}")
    }

    /// A 24 MiB tensor ends up on huge pages with its values unchanged, where the kernel
    /// offers transparent huge pages at all.
    #[test]
    fn collapses_a_tensor_in_place() {
        let n = 6 << 20;
        let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
        let t = Tensor::from_vec(values.clone(), n, &Device::Cpu).unwrap();
        let address = {
            let (storage, _) = t.storage_and_layout();
            match &*storage {
                Storage::Cpu(cpu) => byte_range(cpu).unwrap().0,
                _ => unreachable!(),
            }
        };
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let collapsed = back_with_huge_pages(&[&t]);
        assert_eq!(t.to_vec1::<f32>().unwrap(), values);
        if thp.is_empty() || thp.contains("[never]") {
            assert_eq!(collapsed, 0);
            return;
        }
        // At least the 2 MiB blocks wholly inside the 24 MiB buffer.
        assert!(collapsed >= 22 << 20, "collapsed {collapsed} bytes");
        assert!(smaps_kb(address, "AnonHugePages:") >= 22 << 10);
    }

    /// A 24 MiB buffer of our own ends up on huge pages with its values unchanged, where the
    /// kernel offers transparent huge pages at all.
    #[test]
    fn collapses_a_buffer_in_place() {
        let values: Vec<f32> = (0..6 << 20).map(|i| (i % 1000) as f32).collect();
        let copy = values.clone();
        let collapsed = back_slices_with_huge_pages(&[&values]);
        assert_eq!(values, copy);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            assert_eq!(collapsed, 0);
            return;
        }
        assert!(collapsed >= 22 << 20, "collapsed {collapsed} bytes");
        assert!(smaps_kb(values.as_ptr() as usize, "AnonHugePages:") >= 22 << 10);
        assert_eq!(back_slices_with_huge_pages(&[&values[..1 << 20]]), 0);
    }

    /// Tensors of less than 16 MiB in all are left alone, however many huge-page blocks they
    /// touch.
    #[test]
    fn leaves_small_tensors_alone() {
        let empty = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back_with_huge_pages(&[&empty]), 0);
        let small: Vec<Tensor> = (0..3)
            .map(|_| Tensor::zeros(1 << 20, candle_core::DType::F32, &Device::Cpu).unwrap())
            .collect();
        assert_eq!(back_with_huge_pages(&small.iter().collect::<Vec<_>>()), 0);
    }
}
