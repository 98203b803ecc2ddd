//! Synthetic NHS numbers: valid modulus-11 check digits, never reused.
//!
//! Every number starts with 9, outside the ranges issued to patients in
//! England and Wales. A seeded affine permutation maps each distinct person
//! to a distinct valid number, so no two people ever collide.

/// Number of 8-digit prefixes starting with 9 (90_000_000..=99_999_999).
const PREFIXES: u64 = 10_000_000;
/// For any 8-digit prefix at least 9 of the 10 possible ninth digits give a
/// valid check digit; using exactly 9 slots keeps the mapping a bijection.
const SLOTS: u64 = 9;
/// Size of the permuted index space (and the maximum number of people).
pub(crate) const CAPACITY: u64 = PREFIXES * SLOTS;
/// Multiplier of the permutation; a prime, hence coprime to `CAPACITY`.
const MULTIPLIER: u64 = 2_654_435_761;

/// Weighted digit sum (weights 10 down to 2) of the first `n` digits.
fn weighted_sum(digits: &[u8]) -> u32 {
    digits
        .iter()
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum()
}

/// The modulus-11 check digit for nine leading digits, or `None` when the
/// rules make that base invalid (check value 10).
pub(crate) fn check_digit(first9: &[u8; 9]) -> Option<u8> {
    match 11 - weighted_sum(first9) % 11 {
        11 => Some(0),
        10 => None,
        c => Some(c as u8),
    }
}

/// Allocates NHS numbers to dense person indices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NhsNumbers {
    offset: u64,
}

impl NhsNumbers {
    /// A permutation chosen by `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            offset: crate::random::mix(seed ^ 0x4e48_5321) % CAPACITY,
        }
    }

    /// The ten ASCII digits of the number for person `index`
    /// (`index < CAPACITY`).
    pub(crate) fn number(&self, index: u64) -> [u8; 10] {
        encode((index % CAPACITY * (MULTIPLIER % CAPACITY) + self.offset) % CAPACITY)
    }
}

/// The `x`-th valid number (`x < CAPACITY`) in prefix-major order.
fn encode(x: u64) -> [u8; 10] {
    let slot = (x % SLOTS) as u32;
    let mut prefix = 90_000_000 + x / SLOTS;
    let mut digits = [0u8; 9];
    for d in digits[..8].iter_mut().rev() {
        *d = (prefix % 10) as u8;
        prefix /= 10;
    }
    // The ninth digit weighs 2, so it is invalid when sum + 2d ≡ 1 (mod 11),
    // i.e. d ≡ 6(1 - sum) (mod 11); skip that digit (if it is below 10).
    let invalid = 6 * (12 - weighted_sum(&digits[..8]) % 11) % 11;
    digits[8] = if slot < invalid { slot } else { slot + 1 } as u8;
    let check = check_digit(&digits).unwrap_or_default();
    let mut out = [b'0'; 10];
    for (o, d) in out.iter_mut().zip(digits.iter().chain(&[check])) {
        *o += d;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// True when `s` is ten digits with a correct modulus-11 check digit.
    pub(crate) fn is_valid(s: &str) -> bool {
        let b = s.as_bytes();
        if b.len() != 10 || !b.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let mut first9 = [0u8; 9];
        for (d, c) in first9.iter_mut().zip(b) {
            *d = c - b'0';
        }
        check_digit(&first9) == Some(b[9] - b'0')
    }

    #[test]
    fn known_numbers() {
        // Published example NHS numbers.
        assert!(is_valid("9434765919"));
        assert!(is_valid("4010232137"));
        assert!(!is_valid("9434765918"));
        assert!(!is_valid("943476591"));
    }

    #[test]
    fn allocation_is_valid_and_distinct() {
        let alloc = NhsNumbers::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20_000 {
            let n = alloc.number(i);
            let s = std::str::from_utf8(&n).expect("ascii");
            assert!(is_valid(s), "{s}");
            assert!(s.starts_with('9'));
            assert!(seen.insert(n), "duplicate {s}");
        }
    }

    #[test]
    fn every_slot_of_a_prefix_is_valid_and_distinct() {
        for prefix in [0u64, 1_234_567, PREFIXES - 1] {
            let numbers: std::collections::BTreeSet<[u8; 10]> = (0..SLOTS)
                .map(|slot| encode(prefix * SLOTS + slot))
                .collect();
            assert_eq!(numbers.len(), SLOTS as usize);
            for n in numbers {
                assert!(is_valid(std::str::from_utf8(&n).expect("ascii")));
            }
        }
    }
}
