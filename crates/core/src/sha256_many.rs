//! SHA-256 of many inputs of one length at once, where the CPU allows: 16 side by side in the 16
//! lanes of AVX-512 registers (AVX-512 F and BW), else 4 interleaved through the SHA extensions
//! (SHA-NI), else one at a time through `sha2`.
//!
//! Pages are hashed by the gigabyte (every page of a freeze, every page a thaw hands to CRIU), and
//! a page is a short message: `sha2`'s SHA-NI path hashes one at a time, each 64-byte block
//! waiting on the one before it. Independent pages side by side keep the units busy instead. On
//! a Xeon (2.1 GHz), 16 lanes of AVX-512 hashed 2.1–2.5 GB/s a core for 4 KiB pages against
//! 1.2–1.3 GB/s one at a time; on an AMD EPYC (Zen 4), AVX-512 2.7–2.95 GB/s, 4 pages through
//! SHA-NI 2.9–3.2 GB/s, one at a time 1.75 GB/s. `PF_PAGE_HASH=scalar|x16|ni` forces one (to
//! compare whole commands; one the CPU lacks falls back to `sha2`). The result is SHA-256
//! exactly (FIPS 180-4), checked against `sha2` in the tests below, so nothing stored changes.
//!
//! The `unsafe` here is the intrinsics (callable only once the CPU is known to have the
//! features) and their unaligned loads and stores, each inside its slice.
#![allow(unsafe_code)]

use crate::Digest256;
use sha2::{Digest as _, Sha256};

/// Inputs hashed side by side by the AVX-512 kernel.
const LANES: usize = 16;

/// How `digest_many` hashes: chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// 16 lanes of AVX-512.
    X16,
    /// 4 inputs interleaved through SHA-NI.
    Ni4,
    /// `sha2`, one input at a time.
    Scalar,
}

fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let forced = std::env::var("PF_PAGE_HASH").ok();
        match forced.as_deref() {
            Some("scalar") => Kernel::Scalar,
            Some("x16") if has_x16() => Kernel::X16,
            Some("ni") if has_ni() => Kernel::Ni4,
            Some(v @ ("x16" | "ni")) => {
                tracing::warn!(
                    PF_PAGE_HASH = v,
                    "this CPU cannot hash pages that way: one at a time instead"
                );
                Kernel::Scalar
            }
            Some(v) if !v.is_empty() => {
                tracing::warn!(
                    PF_PAGE_HASH = v,
                    "not a way to hash pages (scalar, x16 or ni): ignored"
                );
                default_kernel()
            }
            _ => default_kernel(),
        }
    })
}

/// The best kernel this CPU has. AVX-512 first: alone, 4 pages through SHA-NI hashed a little
/// faster on an AMD EPYC (2.9–3.2 against 2.7–2.95 GB/s), but a whole freeze, which names its
/// packs through SHA-NI on the other core meanwhile, was no faster with it (1 GiB, 8 rounds:
/// 1.445 s against 1.406 s, CPU 2.165 against 2.094 s).
fn default_kernel() -> Kernel {
    if has_x16() {
        Kernel::X16
    } else if has_ni() {
        Kernel::Ni4
    } else {
        Kernel::Scalar
    }
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

#[cfg(target_arch = "x86_64")]
fn has_ni() -> bool {
    ni::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn has_ni() -> bool {
    false
}

/// The SHA-256 of each input, in order, appended to `out`.
pub(crate) fn digest_many(inputs: &[&[u8]], out: &mut Vec<Digest256>) {
    digest_many_with(kernel(), inputs, out);
}

fn digest_many_with(kernel: Kernel, inputs: &[&[u8]], out: &mut Vec<Digest256>) {
    out.reserve(inputs.len());
    let mut rest = inputs;
    match kernel {
        Kernel::X16 => {
            // Groups of 16 of one length that is a whole number of blocks (pages are); a short
            // last group of at least half is padded with copies of its last input, which costs
            // no more than hashing that half one at a time.
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
        Kernel::Ni4 => {
            // Groups of 4 of one length (any length); a last group of 2 or 3 is padded with
            // copies of its last input.
            while rest.len() >= 2 {
                let n = rest.len().min(4);
                let group: [&[u8]; 4] = std::array::from_fn(|i| rest[i.min(n - 1)]);
                if group.iter().any(|g| g.len() != group[0].len()) {
                    break;
                }
                let digests = ni4(group);
                out.extend(digests[..n].iter().map(|d| Digest256::from_bytes(*d)));
                rest = &rest[n..];
            }
        }
        Kernel::Scalar => {}
    }
    out.extend(
        rest.iter()
            .map(|input| Digest256::from_bytes(Sha256::digest(input).into())),
    );
}

/// The SHA-256 of 4 inputs through SHA-NI. Only called once the CPU is known to have it
/// (`Kernel::Ni4`).
#[cfg(target_arch = "x86_64")]
fn ni4(inputs: [&[u8]; 4]) -> [[u8; 32]; 4] {
    // Checked here too, so that no call can run it on a CPU without the features (the
    // detection is cached: atomic loads).
    assert!(ni::available(), "SHA, SSE4.1 and SSSE3 are needed");
    // SAFETY: the CPU has the features `ni::digest_n` is compiled for (just checked).
    unsafe { ni::digest_n(inputs) }
}

#[cfg(not(target_arch = "x86_64"))]
fn ni4(_inputs: [&[u8]; 4]) -> [[u8; 32]; 4] {
    unreachable!("Kernel::Ni4 is only chosen on x86_64")
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

/// SHA-256 with the CPU's SHA extensions (SHA-NI), several inputs at once in one thread.
///
/// One input's rounds each wait on the one before (`sha256rnds2` takes a few cycles to give
/// its result and the next round needs it), so a single stream leaves the SHA unit idle most
/// of the time: `sha2` (one input, SHA-NI) hashes about 1.7 GB/s here. Interleaving the rounds
/// of independent inputs fills those cycles.
#[cfg(target_arch = "x86_64")]
mod ni {
    use std::arch::x86_64::*;

    /// SHA-256's initial hash value.
    const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// SHA-256's round constants, four to a row.
    const K: [[u32; 4]; 16] = [
        [0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5],
        [0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5],
        [0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3],
        [0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174],
        [0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc],
        [0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da],
        [0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7],
        [0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967],
        [0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13],
        [0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85],
        [0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3],
        [0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070],
        [0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5],
        [0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3],
        [0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208],
        [0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2],
    ];

    /// One input's state as SHA-NI keeps it: (A, B, E, F) and (C, D, G, H).
    #[derive(Clone, Copy)]
    pub(super) struct State(__m128i, __m128i);

    /// The initial state.
    #[inline]
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub(super) fn init() -> State {
        let abcd = _mm_set_epi32(H0[3] as i32, H0[2] as i32, H0[1] as i32, H0[0] as i32);
        let efgh = _mm_set_epi32(H0[7] as i32, H0[6] as i32, H0[5] as i32, H0[4] as i32);
        let badc = _mm_shuffle_epi32::<0xB1>(abcd);
        let hgfe = _mm_shuffle_epi32::<0x1B>(efgh);
        State(
            _mm_alignr_epi8::<8>(badc, hgfe),
            _mm_blend_epi16::<0xF0>(hgfe, badc),
        )
    }

    /// The digest of a finished state.
    #[inline]
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub(super) fn digest(s: State) -> [u8; 32] {
        let abef = _mm_shuffle_epi32::<0x1B>(s.0);
        let cdgh = _mm_shuffle_epi32::<0xB1>(s.1);
        let abcd = _mm_blend_epi16::<0xF0>(abef, cdgh);
        let efgh = _mm_alignr_epi8::<8>(cdgh, abef);
        let mut words = [0u32; 8];
        // SAFETY: `words` is 32 bytes, the two unaligned 16-byte stores.
        unsafe {
            _mm_storeu_si128(words.as_mut_ptr().cast(), abcd);
            _mm_storeu_si128(words.as_mut_ptr().add(4).cast(), efgh);
        }
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// The compression function on one 64-byte block of each of `N` inputs, interleaved.
    #[inline]
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub(super) fn compress<const N: usize>(states: &mut [State; N], blocks: [&[u8; 64]; N]) {
        let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        let saved = *states;
        let mut w = [[_mm_setzero_si128(); 4]; N];
        for (w, block) in w.iter_mut().zip(blocks) {
            for (j, w) in w.iter_mut().enumerate() {
                // SAFETY: bytes 16j..16j+16 of a 64-byte block, the unaligned load's size.
                let v = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * j).cast()) };
                *w = _mm_shuffle_epi8(v, swap);
            }
        }
        // Four rounds: group `i` of the schedule (extended from the four before it from group 4
        // on; `$w0` holds group i - 4 and becomes group i) for every input, then the next input.
        macro_rules! four_rounds {
            ($i:expr, $w0:expr, $w1:expr, $w2:expr, $w3:expr) => {{
                // SAFETY: `K[$i]` is 4 u32s, the unaligned 16-byte load.
                let k = unsafe { _mm_loadu_si128(K[$i].as_ptr().cast()) };
                for (s, w) in states.iter_mut().zip(w.iter_mut()) {
                    if $i >= 4 {
                        let t = _mm_sha256msg1_epu32(w[$w0], w[$w1]);
                        let t = _mm_add_epi32(t, _mm_alignr_epi8::<4>(w[$w3], w[$w2]));
                        w[$w0] = _mm_sha256msg2_epu32(t, w[$w3]);
                    }
                    let msg = _mm_add_epi32(w[$w0], k);
                    s.1 = _mm_sha256rnds2_epu32(s.1, s.0, msg);
                    s.0 = _mm_sha256rnds2_epu32(s.0, s.1, _mm_shuffle_epi32::<0x0E>(msg));
                }
            }};
        }
        four_rounds!(0, 0, 1, 2, 3);
        four_rounds!(1, 1, 2, 3, 0);
        four_rounds!(2, 2, 3, 0, 1);
        four_rounds!(3, 3, 0, 1, 2);
        four_rounds!(4, 0, 1, 2, 3);
        four_rounds!(5, 1, 2, 3, 0);
        four_rounds!(6, 2, 3, 0, 1);
        four_rounds!(7, 3, 0, 1, 2);
        four_rounds!(8, 0, 1, 2, 3);
        four_rounds!(9, 1, 2, 3, 0);
        four_rounds!(10, 2, 3, 0, 1);
        four_rounds!(11, 3, 0, 1, 2);
        four_rounds!(12, 0, 1, 2, 3);
        four_rounds!(13, 1, 2, 3, 0);
        four_rounds!(14, 2, 3, 0, 1);
        four_rounds!(15, 3, 0, 1, 2);
        for (s, saved) in states.iter_mut().zip(saved) {
            s.0 = _mm_add_epi32(s.0, saved.0);
            s.1 = _mm_add_epi32(s.1, saved.1);
        }
    }

    /// Whether the CPU has what this module needs.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    }

    /// The message's last bytes (`tail`, under 64) and its padding: one or two blocks, in `buf`;
    /// returns how many.
    fn pad(tail: &[u8], total: usize, buf: &mut [u8; 128]) -> usize {
        buf.fill(0);
        buf[..tail.len()].copy_from_slice(tail);
        buf[tail.len()] = 0x80;
        let blocks = if tail.len() < 56 { 1 } else { 2 };
        buf[64 * blocks - 8..64 * blocks].copy_from_slice(&((total as u64) * 8).to_be_bytes());
        blocks
    }

    /// Block `b` of `input` (which has at least `b + 1` whole blocks).
    #[inline]
    fn block(input: &[u8], b: usize) -> &[u8; 64] {
        input[64 * b..64 * b + 64].try_into().expect("64 bytes")
    }

    /// The SHA-256 of each of `N` inputs of any lengths, their blocks interleaved as far as they
    /// go side by side (all the way when the lengths are equal).
    ///
    /// # Safety
    ///
    /// The CPU must have SHA, SSE4.1 and SSSE3 ([`available`]).
    #[target_feature(enable = "sha,sse4.1,ssse3")]
    pub(super) unsafe fn digest_n<const N: usize>(inputs: [&[u8]; N]) -> [[u8; 32]; N] {
        let mut states = [init(); N];
        let common = inputs.iter().map(|i| i.len() / 64).min().unwrap_or(0);
        for b in 0..common {
            compress(&mut states, std::array::from_fn(|l| block(inputs[l], b)));
        }
        let mut bufs = [[0u8; 128]; N];
        if inputs.iter().all(|i| i.len() == inputs[0].len()) {
            let mut blocks = 0;
            for (buf, input) in bufs.iter_mut().zip(inputs) {
                blocks = pad(&input[64 * common..], input.len(), buf);
            }
            for b in 0..blocks {
                compress(&mut states, std::array::from_fn(|l| block(&bufs[l], b)));
            }
        } else {
            for ((state, buf), input) in states.iter_mut().zip(&mut bufs).zip(inputs) {
                let mut one = [*state];
                let full = input.len() / 64;
                for b in common..full {
                    compress(&mut one, [block(input, b)]);
                }
                for b in 0..pad(&input[64 * full..], input.len(), buf) {
                    compress(&mut one, [block(buf, b)]);
                }
                *state = one[0];
            }
        }
        std::array::from_fn(|l| digest(states[l]))
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

    /// Every kernel this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Scalar];
        if has_x16() {
            k.push(Kernel::X16);
        }
        if has_ni() {
            k.push(Kernel::Ni4);
        }
        k
    }

    #[test]
    fn pages_hash_as_sha2_hashes_them_in_every_batch_size_with_every_kernel() {
        let bytes = noise(4096 * 40, 7);
        // Unaligned too: a page starting one byte in.
        let pages: Vec<&[u8]> = bytes[1..].chunks_exact(4096).collect();
        for kernel in kernels() {
            for n in 0..pages.len() {
                let mut out = Vec::new();
                digest_many_with(kernel, &pages[..n], &mut out);
                assert_eq!(out, reference(&pages[..n]), "{kernel:?}, {n} pages");
            }
        }
        let mut out = Vec::new();
        digest_many(&pages, &mut out);
        assert_eq!(out, reference(&pages), "the kernel chosen here");
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sha_ni_side_by_side_is_sha256_for_every_length_equal_or_not() {
        if !has_ni() {
            // No SHA-NI here: digest_many never takes this path on this machine.
            return;
        }
        let bytes = noise(64 * 1024, 13);
        // Around the padding's edges (55/56 bytes left: one padding block or two) and blocks.
        let lens = [
            0usize, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 4095, 4096, 4097, 9000,
        ];
        for &len in &lens {
            let inputs: [&[u8]; 4] = std::array::from_fn(|i| &bytes[i * 5..i * 5 + len]);
            let mut out = Vec::new();
            digest_many_with(Kernel::Ni4, &inputs, &mut out);
            assert_eq!(out, reference(&inputs), "length {len}");
        }
        // Unequal lengths side by side: the common blocks together, the rest one at a time.
        for (&a, &b) in lens.iter().zip(lens.iter().rev()) {
            let inputs = [&bytes[..a], &bytes[7..7 + b]];
            // SAFETY: the CPU has SHA-NI (checked above).
            let got = unsafe { ni::digest_n(inputs) };
            let got: Vec<Digest256> = got.iter().map(|d| Digest256::from_bytes(*d)).collect();
            assert_eq!(got, reference(&inputs), "lengths {a} and {b}");
        }
        let empty: [&[u8]; 4] = [b""; 4];
        let mut out = Vec::new();
        digest_many_with(Kernel::Ni4, &empty, &mut out);
        assert_eq!(
            out[3].to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn mixed_lengths_and_partial_blocks_hash_right_with_every_kernel() {
        let bytes = noise(20_000, 3);
        let mut inputs: Vec<&[u8]> = (0..20).map(|i| &bytes[i..i + 4096]).collect();
        inputs[3] = &bytes[..100];
        inputs.extend((0..16).map(|i| &bytes[i..i + 1000]));
        for kernel in kernels() {
            let mut out = Vec::new();
            digest_many_with(kernel, &inputs, &mut out);
            assert_eq!(out, reference(&inputs), "{kernel:?}");
        }
        let mut out = Vec::new();
        digest_many(&inputs, &mut out);
        assert_eq!(out, reference(&inputs), "the kernel chosen here");
    }

    #[test]
    fn one_changed_bit_in_one_lane_changes_that_lane_only() {
        for kernel in kernels() {
            let mut bytes = noise(4096 * 16, 5);
            let before: Vec<Digest256> = {
                let pages: Vec<&[u8]> = bytes.chunks_exact(4096).collect();
                let mut out = Vec::new();
                digest_many_with(kernel, &pages, &mut out);
                out
            };
            bytes[4096 * 9 + 4095] ^= 1;
            let pages: Vec<&[u8]> = bytes.chunks_exact(4096).collect();
            let mut after = Vec::new();
            digest_many_with(kernel, &pages, &mut after);
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                assert_eq!(b == a, i != 9, "{kernel:?}, page {i}");
            }
            assert_eq!(after, reference(&pages), "{kernel:?}");
        }
    }
}
