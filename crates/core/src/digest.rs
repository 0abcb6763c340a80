//! `Digest256`: `sha256:<64 lowercase hex>` of a blob's raw bytes.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";

/// The SHA-256 of a blob's raw (uncompressed) bytes, written `sha256:<64 lowercase hex>`.
///
/// Parsing is strict: the prefix, exactly 64 hex digits, lower case only. A value of this type is
/// therefore always safe to turn into a file name.
#[derive(Clone, Copy, Eq)]
pub struct Digest256([u8; 32]);

// Compared as four 64-bit words, not with a `memcmp` call: a freeze compares digests hundreds of
// thousands of times (its maps, sorting and searching the page index). The order is the bytes'
// (words read big-endian), which is the order page index runs are sorted in on disk.
impl Digest256 {
    fn word(&self, i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[i * 8..i * 8 + 8]);
        u64::from_be_bytes(w)
    }
}

impl PartialEq for Digest256 {
    fn eq(&self, other: &Self) -> bool {
        (0..4).fold(0, |diff, i| diff | (self.word(i) ^ other.word(i))) == 0
    }
}

impl Ord for Digest256 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (0..4)
            .map(|i| self.word(i).cmp(&other.word(i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl std::hash::Hash for Digest256 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for Digest256 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A `HashMap` keyed by digests, hashed the cheap way [`DigestState`] does.
pub type DigestMap<V> = std::collections::HashMap<Digest256, V, DigestState>;

/// Hashes [`Digest256`] keys for maps. A digest is already uniform, so 8 of its bytes, mixed
/// with a random per-map key (a folded multiply), are its hash: cheaper than std's SipHash of
/// all 32 bytes, where a freeze keeps a map entry for every page. The key keeps bucket positions
/// unknown to whoever chooses the hashed bytes (page contents), so they cannot be crowded.
/// Meant for digests only: other keys would be hashed by 8 bytes of each write.
#[derive(Clone, Debug)]
pub struct DigestState {
    k0: u64,
    k1: u64,
}

impl Default for DigestState {
    fn default() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        // std seeds RandomState from the operating system, and varies it per instance.
        let random = |n: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(n);
            h.finish()
        };
        Self {
            k0: random(0),
            k1: random(1) | 1,
        }
    }
}

impl std::hash::BuildHasher for DigestState {
    type Hasher = DigestKeyHasher;

    fn build_hasher(&self) -> DigestKeyHasher {
        DigestKeyHasher {
            k1: self.k1,
            acc: self.k0,
        }
    }
}

/// The hasher [`DigestState`] builds.
#[derive(Debug)]
pub struct DigestKeyHasher {
    k1: u64,
    acc: u64,
}

impl std::hash::Hasher for DigestKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.acc ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, n: usize) {
        // An array's length prefix: the same for every digest.
        self.acc = self.acc.rotate_left(5) ^ n as u64;
    }

    fn finish(&self) -> u64 {
        let wide = u128::from(self.acc) * u128::from(self.k1);
        (wide as u64) ^ ((wide >> 64) as u64)
    }
}

/// Why a string is not a [`Digest256`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDigestError {
    /// The string does not start with `sha256:`.
    #[error("digest {input:?} does not start with \"sha256:\"")]
    Prefix { input: String },
    /// The hex part is not 64 characters long.
    #[error("digest {input:?} has {len} hex digits, expected 64")]
    Length { input: String, len: usize },
    /// The hex part holds something other than `0-9a-f`.
    #[error("digest {input:?} has a character that is not lowercase hex: {bad:?}")]
    NotHex { input: String, bad: char },
}

impl Digest256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// A digest from its 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest256 {
    type Err = ParseDigestError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let Some(hex_part) = input.strip_prefix(PREFIX) else {
            return Err(ParseDigestError::Prefix {
                input: input.to_owned(),
            });
        };
        if let Some(bad) = hex_part
            .chars()
            .find(|c| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(ParseDigestError::NotHex {
                input: input.to_owned(),
                bad,
            });
        }
        if hex_part.len() != 64 {
            return Err(ParseDigestError::Length {
                input: input.to_owned(),
                len: hex_part.len(),
            });
        }
        let mut out = [0u8; 32];
        // Cannot fail: 64 lowercase hex digits were checked above.
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| ParseDigestError::Length {
            input: input.to_owned(),
            len: hex_part.len(),
        })?;
        Ok(Self(out))
    }
}

impl fmt::Display for Digest256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest256({self})")
    }
}

impl serde::Serialize for Digest256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest256 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 that ends in a [`Digest256`].
#[derive(Clone, Default)]
pub struct DigestHasher {
    inner: Sha256,
    len: u64,
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestHasher")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl DigestHasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// How many bytes have been fed.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether no bytes have been fed.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest256 {
        Digest256(self.inner.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_compare_as_their_bytes() {
        let digests: Vec<Digest256> = (0u32..300)
            .map(|i| {
                // Some share long prefixes, so every word gets compared.
                let mut b = *Digest256::of(&(i / 7).to_le_bytes()).as_bytes();
                b[31 - (i as usize % 32)] ^= (i % 5) as u8;
                Digest256::from_bytes(b)
            })
            .collect();
        for a in &digests {
            for b in &digests {
                assert_eq!(a.cmp(b), a.as_bytes().cmp(b.as_bytes()), "{a} {b}");
                assert_eq!(a == b, a.as_bytes() == b.as_bytes());
            }
        }
    }

    #[test]
    fn digest_maps_hash_digests_apart() {
        use std::hash::BuildHasher as _;
        let state = DigestState::default();
        let a = Digest256::of(b"a");
        let b = Digest256::of(b"b");
        assert_eq!(state.hash_one(a), state.hash_one(a));
        assert_ne!(state.hash_one(a), state.hash_one(b));
        // Another map, another key.
        assert_ne!(state.hash_one(a), DigestState::default().hash_one(a));
        let mut map: DigestMap<u32> = DigestMap::default();
        for i in 0..10_000u32 {
            map.insert(Digest256::of(&i.to_le_bytes()), i);
        }
        assert_eq!(map.len(), 10_000);
        assert_eq!(map[&Digest256::of(&77u32.to_le_bytes())], 77);
    }

    #[test]
    fn digest_of_empty_is_known() {
        assert_eq!(Digest256::of(b"").to_string(), EMPTY);
        assert_eq!(EMPTY.parse::<Digest256>(), Ok(Digest256::of(b"")));
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut h = DigestHasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.len(), 11);
        assert_eq!(h.finish(), Digest256::of(b"hello world"));
    }

    #[test]
    fn parse_rejects_malformed() {
        let upper = EMPTY.to_uppercase().replace("SHA256:", "sha256:");
        let cases = [
            ("", "prefix"),
            ("e3b0c442", "prefix"),
            ("sha512:e3b0", "prefix"),
            (
                "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "prefix",
            ),
            ("sha256:", "length"),
            ("sha256:e3b0", "length"),
            (&format!("{EMPTY}00"), "length"),
            (upper.as_str(), "hex"),
            ("sha256:../../x", "hex"),
            (
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
                "hex",
            ),
            ("sha256:zz", "hex"),
        ];
        for (input, why) in cases {
            let err = input.parse::<Digest256>().expect_err(input);
            let got = match err {
                ParseDigestError::Prefix { .. } => "prefix",
                ParseDigestError::Length { .. } => "length",
                ParseDigestError::NotHex { .. } => "hex",
            };
            assert_eq!(got, why, "{input}");
        }
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let d = Digest256::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest256>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest256>("\"sha256:../../etc/passwd\"").is_err());
        assert!(serde_json::from_str::<Digest256>("\"sha256:ABC\"").is_err());
    }
}
