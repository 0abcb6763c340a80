//! SHA-256 of many inputs of one length at once: 16 of them side by side in the 16 lanes of
//! AVX-512 registers, where the CPU has AVX-512 (F and BW), else one at a time through `sha2`.
//!
//! Pages are hashed by the gigabyte (every page of a freeze, every page a thaw hands to CRIU), and
//! a page is a short message: `sha2`'s SHA-NI path hashes one at a time, each 64-byte block
//! waiting on the one before it. Sixteen independent pages in the lanes of one register keep
//! the vector units busy instead: on the bench machine (Xeon, 2.1 GHz) 2.1–2.5 GB/s a core for
//! 4 KiB pages against 1.2–1.3 GB/s one at a time. `PF_PAGE_HASH=scalar` turns this path off, to
//! compare whole commands. The result is SHA-256 exactly (FIPS 180-4), checked against `sha2` in
//! the tests below, so nothing stored changes.
//!
//! The `unsafe` here is the intrinsics (callable only once the CPU is known to have the
//! features) and their unaligned loads, each inside its input slice.
#![allow(unsafe_code)]

use crate::Digest256;
use sha2::{Digest as _, Sha256};

/// Inputs hashed side by side.
const LANES: usize = 16;

/// How `digest_many` hashes: chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// 16 lanes of AVX-512.
    X16,
    /// `sha2`, one input at a time.
    Scalar,
}

fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        // PF_PAGE_HASH=scalar turns the vector path off (to compare the two).
        if std::env::var_os("PF_PAGE_HASH").is_some_and(|v| v == "scalar") {
            return Kernel::Scalar;
        }
        if has_x16() {
            Kernel::X16
        } else {
            Kernel::Scalar
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn has_x16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_x16() -> bool {
    false
}

/// The SHA-256 of each input, in order, appended to `out`.
pub(crate) fn digest_many(inputs: &[&[u8]], out: &mut Vec<Digest256>) {
    digest_many_with(kernel(), inputs, out);
}

fn digest_many_with(kernel: Kernel, inputs: &[&[u8]], out: &mut Vec<Digest256>) {
    out.reserve(inputs.len());
    let mut rest = inputs;
    if kernel == Kernel::X16 {
        // Groups of 16 of one length that is a whole number of blocks (pages are); a short
        // last group of at least half is padded with copies of its last input, which costs no
        // more than hashing that half one at a time.
        while rest.len() >= LANES / 2 {
            let n = rest.len().min(LANES);
            let group: [&[u8]; LANES] = std::array::from_fn(|i| rest[i.min(n - 1)]);
            let len = group[0].len();
            if !len.is_multiple_of(64) || group.iter().any(|g| g.len() != len) {
                break;
            }
            let digests = x16(&group);
            out.extend(digests[..n].iter().map(|d| Digest256::from_bytes(*d)));
            rest = &rest[n..];
        }
    }
    out.extend(
        rest.iter()
            .map(|input| Digest256::from_bytes(Sha256::digest(input).into())),
    );
}

/// The SHA-256 of 16 inputs of one length, a multiple of 64 bytes. Only called once the CPU is
/// known to have AVX-512 F and BW (`Kernel::X16`).
#[cfg(target_arch = "x86_64")]
fn x16(inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
    // Checked here, not only where `Kernel::X16` is chosen, so that no call can run it on a
    // CPU without the features (the detection is cached: an atomic load).
    assert!(has_x16(), "AVX-512 F and BW are needed");
    // SAFETY: the CPU has avx512f and avx512bw (just checked), the features
    // `x86::digest16` is compiled for; it checks the lengths itself.
    unsafe { x86::digest16(inputs) }
}

#[cfg(not(target_arch = "x86_64"))]
fn x16(_inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
    unreachable!("Kernel::X16 is only chosen on x86_64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// SHA-256's round constants.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// SHA-256's initial hash value.
    const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// `x ^ y ^ z` (`vpternlogd` truth table 0x96).
    const XOR3: i32 = 0x96;
    /// `Ch(e, f, g)`: `f` where `e`, else `g` (0xCA).
    const CH: i32 = 0xCA;
    /// `Maj(a, b, c)`: the majority bit (0xE8).
    const MAJ: i32 = 0xE8;

    /// Rows (one input's 16 words each) into columns (word j of all 16 inputs each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // Within each 128-bit lane, 4x4 blocks of words: t[4i + m] holds word 4k + m of rows
        // 4i..4i+3 in lane k.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            let (a, b, c, d) = (r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]);
            let ab_lo = _mm512_unpacklo_epi32(a, b);
            let ab_hi = _mm512_unpackhi_epi32(a, b);
            let cd_lo = _mm512_unpacklo_epi32(c, d);
            let cd_hi = _mm512_unpackhi_epi32(c, d);
            t[4 * i] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
            t[4 * i + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
            t[4 * i + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
            t[4 * i + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
        }
        // Then the 128-bit lanes, 4x4: column 4k + m takes lane k of t[m], t[4 + m], t[8 + m],
        // t[12 + m].
        let mut out = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            let (a, b, c, d) = (t[m], t[4 + m], t[8 + m], t[12 + m]);
            let ab01 = _mm512_shuffle_i32x4::<0x44>(a, b);
            let ab23 = _mm512_shuffle_i32x4::<0xEE>(a, b);
            let cd01 = _mm512_shuffle_i32x4::<0x44>(c, d);
            let cd23 = _mm512_shuffle_i32x4::<0xEE>(c, d);
            out[m] = _mm512_shuffle_i32x4::<0x88>(ab01, cd01);
            out[4 + m] = _mm512_shuffle_i32x4::<0xDD>(ab01, cd01);
            out[8 + m] = _mm512_shuffle_i32x4::<0x88>(ab23, cd23);
            out[12 + m] = _mm512_shuffle_i32x4::<0xDD>(ab23, cd23);
        }
        out
    }

    /// One round, `t` (0..64), its schedule word in `w[i]` (`i` = `t % 16`), extending the
    /// schedule first from round 16 on. The state's eight words are named so that the caller
    /// rotates names instead of moving registers: the round adds `T1` into `$d` (the new `e`)
    /// and leaves `T1 + T2` in `$h` (the new `a`).
    macro_rules! round {
        ($w:ident, $t:expr, $i:expr, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {{
            if $t >= 16 {
                let w2 = $w[($i + 14) % 16];
                let w15 = $w[($i + 1) % 16];
                let s1 = _mm512_ternarylogic_epi32::<XOR3>(
                    _mm512_ror_epi32::<17>(w2),
                    _mm512_ror_epi32::<19>(w2),
                    _mm512_srli_epi32::<10>(w2),
                );
                let s0 = _mm512_ternarylogic_epi32::<XOR3>(
                    _mm512_ror_epi32::<7>(w15),
                    _mm512_ror_epi32::<18>(w15),
                    _mm512_srli_epi32::<3>(w15),
                );
                $w[$i] = _mm512_add_epi32(
                    _mm512_add_epi32($w[$i], s0),
                    _mm512_add_epi32(s1, $w[($i + 9) % 16]),
                );
            }
            let sigma1 = _mm512_ternarylogic_epi32::<XOR3>(
                _mm512_ror_epi32::<6>($e),
                _mm512_ror_epi32::<11>($e),
                _mm512_ror_epi32::<25>($e),
            );
            let ch = _mm512_ternarylogic_epi32::<CH>($e, $f, $g);
            let kw = _mm512_add_epi32(_mm512_set1_epi32(K[$t] as i32), $w[$i]);
            let t1 = _mm512_add_epi32(_mm512_add_epi32($h, sigma1), _mm512_add_epi32(ch, kw));
            let sigma0 = _mm512_ternarylogic_epi32::<XOR3>(
                _mm512_ror_epi32::<2>($a),
                _mm512_ror_epi32::<13>($a),
                _mm512_ror_epi32::<22>($a),
            );
            let maj = _mm512_ternarylogic_epi32::<MAJ>($a, $b, $c);
            $d = _mm512_add_epi32($d, t1);
            $h = _mm512_add_epi32(t1, _mm512_add_epi32(sigma0, maj));
        }};
    }

    /// Rounds `16q`..`16q + 16`.
    macro_rules! sixteen_rounds {
        ($w:ident, $q:expr, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {{
            round!($w, 16 * $q, 0, $a, $b, $c, $d, $e, $f, $g, $h);
            round!($w, 16 * $q + 1, 1, $h, $a, $b, $c, $d, $e, $f, $g);
            round!($w, 16 * $q + 2, 2, $g, $h, $a, $b, $c, $d, $e, $f);
            round!($w, 16 * $q + 3, 3, $f, $g, $h, $a, $b, $c, $d, $e);
            round!($w, 16 * $q + 4, 4, $e, $f, $g, $h, $a, $b, $c, $d);
            round!($w, 16 * $q + 5, 5, $d, $e, $f, $g, $h, $a, $b, $c);
            round!($w, 16 * $q + 6, 6, $c, $d, $e, $f, $g, $h, $a, $b);
            round!($w, 16 * $q + 7, 7, $b, $c, $d, $e, $f, $g, $h, $a);
            round!($w, 16 * $q + 8, 8, $a, $b, $c, $d, $e, $f, $g, $h);
            round!($w, 16 * $q + 9, 9, $h, $a, $b, $c, $d, $e, $f, $g);
            round!($w, 16 * $q + 10, 10, $g, $h, $a, $b, $c, $d, $e, $f);
            round!($w, 16 * $q + 11, 11, $f, $g, $h, $a, $b, $c, $d, $e);
            round!($w, 16 * $q + 12, 12, $e, $f, $g, $h, $a, $b, $c, $d);
            round!($w, 16 * $q + 13, 13, $d, $e, $f, $g, $h, $a, $b, $c);
            round!($w, 16 * $q + 14, 14, $c, $d, $e, $f, $g, $h, $a, $b);
            round!($w, 16 * $q + 15, 15, $b, $c, $d, $e, $f, $g, $h, $a);
        }};
    }

    /// The compression function on one block of each lane (`w`: the block's 16 words, word j
    /// of every lane in `w[j]`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn compress(state: &mut [__m512i; 8], mut w: [__m512i; 16]) {
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        sixteen_rounds!(w, 0, a, b, c, d, e, f, g, h);
        sixteen_rounds!(w, 1, a, b, c, d, e, f, g, h);
        sixteen_rounds!(w, 2, a, b, c, d, e, f, g, h);
        sixteen_rounds!(w, 3, a, b, c, d, e, f, g, h);
        for (s, n) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = _mm512_add_epi32(*s, n);
        }
    }

    /// The SHA-256 of each of 16 inputs of one length, a whole number of 64-byte blocks.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn digest16(inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
        let len = inputs[0].len();
        assert!(
            len.is_multiple_of(64) && inputs.iter().all(|i| i.len() == len),
            "16 inputs of one length, whole blocks"
        );
        let mut state = [_mm512_setzero_si512(); 8];
        for (s, h) in state.iter_mut().zip(H0) {
            *s = _mm512_set1_epi32(h as i32);
        }
        // Big-endian words: reverse the bytes of each 32-bit word.
        let swap = _mm512_set4_epi32(0x0c0d_0e0f, 0x0809_0a0b, 0x0405_0607, 0x0001_0203);
        for block in 0..len / 64 {
            // Plain loops, not `array::map`: a generic helper is compiled without these
            // target features and would not be inlined.
            let mut rows = [_mm512_setzero_si512(); 16];
            for (row, input) in rows.iter_mut().zip(inputs) {
                let bytes = &input[64 * block..64 * block + 64];
                // SAFETY: `bytes` is 64 bytes long, the size of the unaligned load.
                *row = unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) };
            }
            let mut w = transpose(rows);
            for col in &mut w {
                *col = _mm512_shuffle_epi8(*col, swap);
            }
            compress(&mut state, w);
        }
        // The padding block, the same in every lane: 0x80, zeros, the length in bits.
        let bits = (len as u64) * 8;
        let mut w = [_mm512_setzero_si512(); 16];
        w[0] = _mm512_set1_epi32(0x8000_0000_u32 as i32);
        w[14] = _mm512_set1_epi32((bits >> 32) as u32 as i32);
        w[15] = _mm512_set1_epi32(bits as u32 as i32);
        compress(&mut state, w);
        let mut words = [[0u32; LANES]; 8];
        for (out, s) in words.iter_mut().zip(state) {
            // SAFETY: `out` is 16 u32s, the 64 bytes the unaligned store writes.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), s) };
        }
        std::array::from_fn(|lane| {
            let mut digest = [0u8; 32];
            for (i, w) in words.iter().enumerate() {
                digest[4 * i..4 * i + 4].copy_from_slice(&w[lane].to_be_bytes());
            }
            digest
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that look random (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn reference(inputs: &[&[u8]]) -> Vec<Digest256> {
        inputs
            .iter()
            .map(|i| Digest256::from_bytes(Sha256::digest(i).into()))
            .collect()
    }

    #[test]
    fn pages_hash_as_sha2_hashes_them_in_every_batch_size() {
        let bytes = noise(4096 * 40, 7);
        // Unaligned too: a page starting one byte in.
        let pages: Vec<&[u8]> = bytes[1..].chunks_exact(4096).collect();
        for n in 0..pages.len() {
            let mut out = Vec::new();
            digest_many(&pages[..n], &mut out);
            assert_eq!(out, reference(&pages[..n]), "{n} pages");
        }
    }

    #[test]
    fn the_vector_path_is_sha256_for_lengths_of_whole_blocks() {
        if !has_x16() {
            // No AVX-512 here: digest_many never takes the vector path on this machine.
            return;
        }
        let bytes = noise(64 * 1024, 11);
        for len in [0usize, 64, 128, 640, 4096, 8192] {
            let inputs: Vec<&[u8]> = (0..16).map(|i| &bytes[i * 3..i * 3 + len]).collect();
            let mut out = Vec::new();
            digest_many_with(Kernel::X16, &inputs, &mut out);
            assert_eq!(out, reference(&inputs), "length {len}");
        }
        // Known answer: SHA-256 of the empty string, and of 64 bytes of 'a'.
        let empty: [&[u8]; 16] = [b""; 16];
        let mut out = Vec::new();
        digest_many_with(Kernel::X16, &empty, &mut out);
        assert_eq!(
            out[5].to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let a64 = [b'a'; 64];
        let inputs: [&[u8]; 16] = [&a64; 16];
        out.clear();
        digest_many_with(Kernel::X16, &inputs, &mut out);
        assert_eq!(
            out[15].to_string(),
            "sha256:ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"
        );
    }

    #[test]
    fn mixed_lengths_and_partial_blocks_go_one_at_a_time() {
        let bytes = noise(20_000, 3);
        let mut inputs: Vec<&[u8]> = (0..20).map(|i| &bytes[i..i + 4096]).collect();
        inputs[3] = &bytes[..100];
        inputs.extend((0..16).map(|i| &bytes[i..i + 1000]));
        let mut out = Vec::new();
        digest_many(&inputs, &mut out);
        assert_eq!(out, reference(&inputs));
    }

    #[test]
    fn one_changed_bit_in_one_lane_changes_that_lane_only() {
        let mut bytes = noise(4096 * 16, 5);
        let before: Vec<Digest256> = {
            let pages: Vec<&[u8]> = bytes.chunks_exact(4096).collect();
            let mut out = Vec::new();
            digest_many(&pages, &mut out);
            out
        };
        bytes[4096 * 9 + 4095] ^= 1;
        let pages: Vec<&[u8]> = bytes.chunks_exact(4096).collect();
        let mut after = Vec::new();
        digest_many(&pages, &mut after);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(b == a, i != 9, "page {i}");
        }
        assert_eq!(after, reference(&pages));
    }
}
