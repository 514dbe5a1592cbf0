//! `process::set_up` in a test binary of its own: malloc's settings are process-wide, and a
//! concurrent test's large allocations would blur what this one reads.

/// Bytes glibc currently holds in mmapped blocks (outside its heaps).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mmapped_bytes() -> usize {
    // SAFETY: mallinfo2 only reads malloc's statistics.
    unsafe { libc::mallinfo2() }.hblkhd
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn activation_sized_buffers_come_from_the_heap() {
    use lowrank_kernels::process::{set_up, USER_MALLOC_SETTINGS};
    if USER_MALLOC_SETTINGS
        .iter()
        .any(|var| std::env::var_os(var).is_some())
    {
        return; // the user's malloc settings win; nothing of ours to check
    }
    set_up();
    // 16 MiB, a large activation buffer: above glibc's default threshold, below ours.
    let before = mmapped_bytes();
    let buffer = vec![1u8; 16 << 20];
    let during = mmapped_bytes();
    assert_eq!(buffer.iter().map(|&b| b as usize).sum::<usize>(), 16 << 20);
    assert!(
        during < before + (16 << 20),
        "a 16 MiB buffer was mmapped ({before} -> {during} bytes): freeing it would hand it back to the kernel"
    );
}
