//! Differential-privacy noise: the zCDP privacy-loss unit [`Rho`], the discrete Gaussian
//! scale [`NoiseScale`] a loss buys, and [`add_noise`].
//!
//! Noise is never hand-rolled and never floating point (Mironov 2012 showed that textbook
//! floating-point Laplace noise leaks the value it hides). Each draw is one call to OpenDP's
//! exact sampler [`opendp::traits::samplers::sample_discrete_gaussian`] (Canonne, Kamath and
//! Steinke 2020), which takes the scale as an exact rational and returns an exact integer
//! distributed as N_Z(0, σ²). Everything from a trust's data to its noised value is integer
//! or exact rational arithmetic: sensitivities are integers (fixed point), σ is a multiple of
//! 1/1000 found by an integer square root, and ρ is an integer count of 10⁻⁹. The `f64`
//! methods here are for display and accuracy metadata only.
//!
//! A discrete Gaussian of scale σ added to an integer statistic of L2 sensitivity Δ satisfies
//! Δ²/(2σ²)-zCDP (CKS20, Theorem 4), so [`NoiseScale::for_sensitivity`] picks the smallest
//! σ with σ² ≥ Δ²/(2ρ).
//!
//! Randomness. OpenDP is built without its default `use-openssl` feature (it would build and
//! link OpenSSL; we keep the build pure Rust). OpenDP then draws its bits from rand 0.7's
//! `thread_rng()`: a per-thread ChaCha20 generator seeded from the operating system
//! (getrandom) on first use, reseeded from it every 64 KiB of output and after a `fork`.
//! OpenDP's own documentation calls this path "non-secure" relative to OpenSSL's
//! `RAND_priv_bytes`; ChaCha20 is a cryptographically secure generator, but two weaknesses
//! are real: if the OS cannot seed the generator on first use, rand panics (we turn that into
//! an error, below), and if a later reseed fails, rand logs it and keeps going on the current
//! ChaCha20 state. The sampler's running time also depends on the value drawn (a timing side
//! channel: an observer who can time individual draws learns something about the noise).
//!
//! Failure is closed: if a draw cannot be made, [`add_noise`] returns an
//! [`ErrorCode::Internal`] error, never the un-noised value.

use std::fmt;

use dashu::integer::{IBig, UBig};
use dashu::rational::RBig;
use opendp::traits::samplers::sample_discrete_gaussian;
use serde::{Deserialize, Serialize};

use crate::{ErrorCode, TallyError};

/// Nano-ρ in one ρ.
const NANOS_PER_RHO: u64 = 1_000_000_000;
/// The largest ρ a policy may state (a guard against typos, not a privacy judgement).
const MAX_RHO_DECIMAL: f64 = 1e6;
/// σ is held in thousandths.
const SIGMA_DENOMINATOR: u128 = 1_000;

/// zCDP privacy-loss ρ, held exactly in integer units of 10⁻⁹ (nano-ρ) so that sums in
/// ledgers never drift. Serialises as the integer number of nanos.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Rho(u64);

impl Rho {
    /// No privacy loss.
    pub const ZERO: Rho = Rho(0);

    /// ρ = `n` × 10⁻⁹.
    pub fn from_nanos(n: u64) -> Rho {
        Rho(n)
    }

    /// ρ in units of 10⁻⁹.
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// ρ from a decimal number in a catalogue or policy, rounded to the nearest nano (values
    /// below half a nano become zero). Refuses NaN, infinities, negatives and values above
    /// 10⁶ with [`ErrorCode::PolicyError`].
    pub fn from_decimal(value: f64) -> Result<Rho, TallyError> {
        if value.is_nan() || value.is_infinite() {
            return Err(TallyError::new(
                ErrorCode::PolicyError,
                format!("privacy loss rho must be a finite number, not {value}"),
            ));
        }
        if value < 0.0 {
            return Err(TallyError::new(
                ErrorCode::PolicyError,
                format!("privacy loss rho must not be negative, got {value}"),
            ));
        }
        if value > MAX_RHO_DECIMAL {
            return Err(TallyError::new(
                ErrorCode::PolicyError,
                format!("privacy loss rho {value} is larger than the maximum 1000000"),
            ));
        }
        // value ≤ 1e6, so value × 1e9 ≤ 1e15 < 2^53: after the product's own (half-ulp)
        // rounding, `round` picks the nearest nano and the cast to u64 is exact.
        Ok(Rho((value * NANOS_PER_RHO as f64).round() as u64))
    }

    /// ρ as a float, for display only.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_RHO as f64
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Rho) -> Option<Rho> {
        self.0.checked_add(other.0).map(Rho)
    }

    /// `self - other`, or zero if `other` is larger.
    pub fn saturating_sub(self, other: Rho) -> Rho {
        Rho(self.0.saturating_sub(other.0))
    }

    /// `self × n`, or `None` on overflow.
    pub fn times(self, n: u64) -> Option<Rho> {
        self.0.checked_mul(n).map(Rho)
    }

    /// One of `parts` equal shares of `self`, rounded down so the shares never add up to more
    /// than the whole. Zero parts gives zero.
    pub fn split(self, parts: u64) -> Rho {
        Rho(self.0.checked_div(parts).unwrap_or(0))
    }

    /// ε of (ε, δ)-DP implied by ρ-zCDP: ε = ρ + 2·sqrt(ρ·ln(1/δ)) (Bun & Steinke 2016,
    /// Prop 1.3); display only. δ must be in (0, 1): δ ≤ 0 (or NaN) gives infinity, δ ≥ 1
    /// gives ρ.
    pub fn epsilon_at(self, delta: f64) -> f64 {
        let rho = self.as_f64();
        if delta.is_nan() || delta <= 0.0 {
            return f64::INFINITY;
        }
        if delta >= 1.0 {
            return rho;
        }
        rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
    }
}

impl fmt::Display for Rho {
    /// Decimal with trailing zeros trimmed: "0.02", "1", "0.000000001".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANOS_PER_RHO;
        let frac = self.0 % NANOS_PER_RHO;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// The scale σ of a discrete Gaussian, an exact rational (multiple of 1/1000) at least as
/// large as the privacy loss requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoiseScale {
    /// σ × 1000.
    thousandths: u128,
}

impl NoiseScale {
    /// No noise (σ = 0).
    pub fn zero() -> NoiseScale {
        NoiseScale { thousandths: 0 }
    }

    /// For a statistic whose L2 sensitivity squared is `sensitivity_squared` (an integer:
    /// sensitivities are integer in fixed point), spending `rho`: the smallest σ = m/1000
    /// with σ² ≥ Δ²/(2ρ). All integer arithmetic. A zero sensitivity needs no noise (σ = 0).
    /// Errors ([`ErrorCode::PolicyError`]) if `rho` is zero or the numbers overflow.
    pub fn for_sensitivity(sensitivity_squared: u128, rho: Rho) -> Result<NoiseScale, TallyError> {
        if rho.nanos() == 0 {
            return Err(TallyError::new(
                ErrorCode::PolicyError,
                "a noise scale cannot be set for a privacy loss of zero",
            ));
        }
        // With ρ = r/10⁹ and σ = m/10³: σ² ≥ Δ²/(2ρ)  ⇔  m² ≥ Δ²·10¹⁵/(2r), and since m² is
        // an integer, ⇔ m² ≥ ⌈Δ²·10¹⁵/(2r)⌉.
        let overflow = || {
            TallyError::new(
                ErrorCode::PolicyError,
                format!(
                    "noise scale overflows for sensitivity squared {sensitivity_squared} \
                     and rho {rho}"
                ),
            )
        };
        let numerator = sensitivity_squared
            .checked_mul(SIGMA_DENOMINATOR * SIGMA_DENOMINATOR * u128::from(NANOS_PER_RHO))
            .ok_or_else(overflow)?;
        let denominator = 2 * u128::from(rho.nanos());
        let target = numerator.div_ceil(denominator);
        Ok(NoiseScale {
            thousandths: ceil_sqrt(target),
        })
    }

    /// σ × 1000, exactly.
    pub fn thousandths(&self) -> u128 {
        self.thousandths
    }

    /// σ as a float, for display only.
    pub fn sd(&self) -> f64 {
        self.thousandths as f64 / SIGMA_DENOMINATOR as f64
    }

    /// The ρ this scale actually spends for that sensitivity, Δ²/(2σ²) (≤ the ρ it was made
    /// for), correctly rounded to f64; for display and tests. Infinite if σ = 0 < Δ².
    pub fn rho_for(&self, sensitivity_squared: u128) -> f64 {
        if sensitivity_squared == 0 {
            return 0.0;
        }
        if self.thousandths == 0 {
            return f64::INFINITY;
        }
        let m = UBig::from(self.thousandths);
        let exact = RBig::from_parts(
            IBig::from(sensitivity_squared) * IBig::from(SIGMA_DENOMINATOR * SIGMA_DENOMINATOR),
            UBig::from(2u8) * &m * &m,
        );
        exact.to_f64().value()
    }

    /// σ as the exact rational OpenDP's sampler takes.
    fn as_rational(&self) -> RBig {
        RBig::from_parts(IBig::from(self.thousandths), UBig::from(SIGMA_DENOMINATOR))
    }
}

/// The smallest `s` with `s² ≥ n`.
fn ceil_sqrt(n: u128) -> u128 {
    let s = n.isqrt();
    // s ≤ 2⁶⁴ - 1, so s² does not overflow.
    if s * s < n { s + 1 } else { s }
}

/// `value` plus one exact discrete Gaussian draw of scale `scale` (integers in, integers out:
/// there is no floating-point path from data to noise). A zero scale returns `value`. If no
/// draw can be made (no entropy) or the sum overflows, the result is an
/// [`ErrorCode::Internal`] error, never the un-noised value.
pub fn add_noise(value: i128, scale: &NoiseScale) -> Result<i128, TallyError> {
    if scale.thousandths == 0 {
        return Ok(value);
    }
    let noise = draw(scale)?;
    let noise = i128::try_from(noise).map_err(|_| {
        TallyError::new(
            ErrorCode::Internal,
            "noise could not be drawn: the draw does not fit in 128 bits",
        )
    })?;
    value.checked_add(noise).ok_or_else(|| {
        TallyError::new(
            ErrorCode::Internal,
            "noise could not be added: the noised value does not fit in 128 bits",
        )
    })
}

/// One draw from N_Z(0, σ²). OpenDP reports a lack of entropy as an error, but rand 0.7
/// panics if the OS cannot seed its generator; both become an error here.
fn draw(scale: &NoiseScale) -> Result<IBig, TallyError> {
    let sigma = scale.as_rational();
    match std::panic::catch_unwind(move || sample_discrete_gaussian(sigma)) {
        Ok(Ok(noise)) => Ok(noise),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "discrete Gaussian sampler failed");
            Err(TallyError::new(
                ErrorCode::Internal,
                "noise could not be drawn",
            ))
        }
        Err(_) => {
            tracing::error!("discrete Gaussian sampler panicked (no entropy?)");
            Err(TallyError::new(
                ErrorCode::Internal,
                "noise could not be drawn",
            ))
        }
    }
}

/// The standard deviation of the sum of independent noises of these scales: sqrt(Σσ²)
/// (display and accuracy metadata only).
pub fn combined_sd(scales: impl IntoIterator<Item = f64>) -> f64 {
    scales.into_iter().map(|s| s * s).sum::<f64>().sqrt()
}

/// Half-width of the 95% interval of noise with standard deviation `sd`: 1.96·sd, plus
/// `rounding/2` if values are rounded to multiples of `rounding` (> 1).
pub fn interval95(sd: f64, rounding: u64) -> f64 {
    let half_step = if rounding > 1 {
        rounding as f64 / 2.0
    } else {
        0.0
    };
    1.96 * sd + half_step
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact moments of N_Z(0, σ²), summed in f64 over |x| ≤ 40σ (the mass beyond is below
    /// e^-800). Returns (variance, P(|X| ≥ 2σ), P(|X| ≥ 3σ)).
    fn exact_discrete_gaussian(sigma: f64) -> (f64, f64, f64) {
        let bound = (40.0 * sigma).ceil() as i64;
        let weight = |x: i64| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp();
        let (mut total, mut second, mut tail2, mut tail3) = (0.0, 0.0, 0.0, 0.0);
        for x in -bound..=bound {
            let w = weight(x);
            let ax = x.unsigned_abs() as f64;
            total += w;
            second += w * (x * x) as f64;
            if ax >= 2.0 * sigma {
                tail2 += w;
            }
            if ax >= 3.0 * sigma {
                tail3 += w;
            }
        }
        (second / total, tail2 / total, tail3 / total)
    }

    /// Draws `n` noises at `scale` and checks them against the exact discrete Gaussian.
    ///
    /// Tolerances (each a false-failure probability of about 6·10⁻⁷ or much less):
    /// - mean within 5·σ/√n of 0 (5 standard errors);
    /// - sample variance within 3% of the exact variance (the standard error of a sample
    ///   variance is about σ²·√(2/n) = 0.45% at n = 10⁵, so 3% is about 6.7 standard errors);
    /// - each tail probability within 5 standard errors √(p(1-p)/n) of the exact value.
    fn check_distribution(scale: &NoiseScale, n: usize) {
        let sigma = scale.sd();
        let draws: Vec<i128> = (0..n).map(|_| add_noise(0, scale).expect("draw")).collect();
        let nf = n as f64;
        let mean = draws.iter().map(|&x| x as f64).sum::<f64>() / nf;
        let variance = draws
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / (nf - 1.0);
        let tail = |k: f64| {
            draws
                .iter()
                .filter(|&&x| (x.abs() as f64) >= k * sigma)
                .count() as f64
                / nf
        };
        let (tail2, tail3) = (tail(2.0), tail(3.0));
        let (exact_var, exact_tail2, exact_tail3) = exact_discrete_gaussian(sigma);
        let se = |p: f64| (p * (1.0 - p) / nf).sqrt();
        eprintln!(
            "sigma {sigma}: n {n}, mean {mean:.4} (tolerance {:.4}), variance {variance:.4} \
             vs exact {exact_var:.4} ({:+.3}%), P(|X|>=2s) {tail2:.5} vs {exact_tail2:.5} \
             (tolerance {:.5}), P(|X|>=3s) {tail3:.5} vs {exact_tail3:.5} (tolerance {:.5})",
            5.0 * sigma / nf.sqrt(),
            100.0 * (variance / exact_var - 1.0),
            5.0 * se(exact_tail2),
            5.0 * se(exact_tail3),
        );
        assert!(
            mean.abs() <= 5.0 * sigma / nf.sqrt(),
            "mean {mean} at sigma {sigma}"
        );
        assert!(
            (variance / exact_var - 1.0).abs() <= 0.03,
            "variance {variance} vs exact {exact_var} at sigma {sigma}"
        );
        assert!(
            (tail2 - exact_tail2).abs() <= 5.0 * se(exact_tail2),
            "P(|X| >= 2 sigma) {tail2} vs exact {exact_tail2} at sigma {sigma}"
        );
        assert!(
            (tail3 - exact_tail3).abs() <= 5.0 * se(exact_tail3),
            "P(|X| >= 3 sigma) {tail3} vs exact {exact_tail3} at sigma {sigma}"
        );
    }

    #[test]
    fn discrete_gaussian_matches_theory_at_rho_0_05() {
        // Δ = 1, ρ = 0.05: σ² ≥ 10, σ = 3.163 (√10 = 3.16228 rounded up to a thousandth).
        let scale = NoiseScale::for_sensitivity(1, Rho::from_decimal(0.05).unwrap()).unwrap();
        assert_eq!(scale.thousandths(), 3_163);
        check_distribution(&scale, 100_000);
    }

    #[test]
    fn discrete_gaussian_matches_theory_at_sigma_25() {
        // Δ = 1, ρ = 1/1250 = 0.0008: σ² ≥ 625, σ = 25 exactly.
        let scale = NoiseScale::for_sensitivity(1, Rho::from_decimal(0.0008).unwrap()).unwrap();
        assert_eq!(scale.thousandths(), 25_000);
        check_distribution(&scale, 100_000);
    }

    #[test]
    fn noise_is_added_to_the_value() {
        for v in [0, 1, -1, 1_000_000, i128::MAX, i128::MIN] {
            assert_eq!(add_noise(v, &NoiseScale::zero()).unwrap(), v);
        }
        let scale = NoiseScale::for_sensitivity(1, Rho::from_decimal(0.02).unwrap()).unwrap();
        assert_eq!(scale.sd(), 5.0);
        let v: i128 = -123_456_789_012;
        let n = 20_000;
        let draws: Vec<i128> = (0..n).map(|_| add_noise(v, &scale).unwrap()).collect();
        let mean_offset = draws.iter().map(|&x| (x - v) as f64).sum::<f64>() / n as f64;
        // 5 standard errors of the mean.
        assert!(
            mean_offset.abs() <= 5.0 * 5.0 / (n as f64).sqrt(),
            "{mean_offset}"
        );
        // The noise is really there: P(X = 0) ≈ 1/(σ√(2π)) ≈ 0.08 at σ = 5.
        let unchanged = draws.iter().filter(|&&x| x == v).count() as f64 / n as f64;
        assert!((0.05..0.11).contains(&unchanged), "{unchanged}");
    }

    #[test]
    fn overflow_is_an_error_never_a_wrapped_value() {
        // At i128::MAX a draw of 0 or below is a legitimate answer; a positive draw overflows
        // and must be an Internal error (never a wrapped or un-noised value). Both happen in
        // 500 draws at σ = 1 with overwhelming probability.
        let scale = NoiseScale::for_sensitivity(1, Rho::from_decimal(0.5).unwrap()).unwrap();
        let mut seen_ok = 0;
        let mut seen_err = 0;
        for _ in 0..500 {
            match add_noise(i128::MAX, &scale) {
                Ok(_) => seen_ok += 1,
                Err(e) => {
                    assert_eq!(e.code, ErrorCode::Internal);
                    seen_err += 1;
                }
            }
        }
        assert!(seen_ok > 0 && seen_err > 0);
    }

    /// σ² ≥ Δ²/(2ρ) and (σ - 0.001)² < Δ²/(2ρ), checked in exact rationals.
    fn assert_smallest_scale(sensitivity_squared: u128, rho: Rho, scale: &NoiseScale) {
        let need = RBig::from_parts(
            IBig::from(sensitivity_squared) * IBig::from(NANOS_PER_RHO),
            UBig::from(2u8) * UBig::from(rho.nanos()),
        );
        let sigma = RBig::from_parts(IBig::from(scale.thousandths()), UBig::from(1000u16));
        let below = RBig::from_parts(
            IBig::from(scale.thousandths()) - IBig::ONE,
            UBig::from(1000u16),
        );
        assert!(
            sigma.clone() * &sigma >= need,
            "sigma too small: {scale:?} for {need}"
        );
        if scale.thousandths() > 0 {
            assert!(
                below.clone() * &below < need,
                "sigma not the smallest: {scale:?}"
            );
        }
    }

    #[test]
    fn noise_scale_is_the_smallest_that_meets_rho() {
        // (Δ², ρ in nanos, σ in thousandths)
        let cases: [(u128, u64, u128); 10] = [
            (1, 20_000_000, 5_000),                         // Δ = 1, ρ = 0.02: σ² ≥ 25
            (1, 50_000_000, 3_163),                         // σ² ≥ 10, √10 = 3.16228
            (4 * 9, 20_000_000, 30_000),                    // Δ = 6, ρ = 0.02: σ² ≥ 900
            (1, 500_000_000, 1_000),                        // σ² ≥ 1
            (1, 1_000_000_000, 708),                        // σ² ≥ 0.5, √0.5 = 0.70711
            (4, 100_000_000, 4_473),                        // σ² ≥ 20, √20 = 4.47214
            (1, 1, 22_360_680),                             // ρ = 10⁻⁹: σ² ≥ 5·10⁸
            (1_000_000_000_000, 10_000_000, 7_071_067_812), // Δ = 10⁶, ρ = 0.01
            (0, 20_000_000, 0),                             // nothing to hide
            (
                100_000_000_000_000_000_000_000,
                1,
                7_071_067_811_865_475_245,
            ), // Δ² = 10²³
        ];
        for (sensitivity_squared, nanos, thousandths) in cases {
            let rho = Rho::from_nanos(nanos);
            let scale = NoiseScale::for_sensitivity(sensitivity_squared, rho).unwrap();
            assert_eq!(
                scale.thousandths(),
                thousandths,
                "Δ² {sensitivity_squared}, ρ {rho}"
            );
            assert_smallest_scale(sensitivity_squared, rho, &scale);
            assert!(scale.rho_for(sensitivity_squared) <= rho.as_f64());
        }
        let scale = NoiseScale::for_sensitivity(1, Rho::from_decimal(0.02).unwrap()).unwrap();
        assert_eq!(scale.rho_for(1), 0.02);
        assert_eq!(NoiseScale::zero().rho_for(1), f64::INFINITY);
        assert_eq!(NoiseScale::zero().rho_for(0), 0.0);
    }

    #[test]
    fn noise_scale_refuses_zero_rho_and_overflow() {
        let e = NoiseScale::for_sensitivity(1, Rho::ZERO).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyError);
        for sensitivity_squared in [u128::MAX, u128::MAX / 1_000_000_000_000_000 + 1] {
            let e =
                NoiseScale::for_sensitivity(sensitivity_squared, Rho::from_nanos(1)).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyError);
            assert!(e.message.contains("overflows"), "{}", e.message);
        }
        // The largest sensitivity that does not overflow, at the largest ρ.
        let largest = u128::MAX / 1_000_000_000_000_000;
        let rho = Rho::from_nanos(u64::MAX);
        let scale = NoiseScale::for_sensitivity(largest, rho).unwrap();
        assert_smallest_scale(largest, rho, &scale);
        // A huge scale still draws (the sampler is arbitrary precision).
        let huge = NoiseScale::for_sensitivity(largest, Rho::from_nanos(1)).unwrap();
        assert_smallest_scale(largest, Rho::from_nanos(1), &huge);
        assert!(add_noise(0, &huge).is_ok());
    }

    #[test]
    fn rho_is_exact_nanos() {
        assert_eq!(Rho::from_decimal(0.02).unwrap().nanos(), 20_000_000);
        assert_eq!(Rho::from_decimal(0.0).unwrap(), Rho::ZERO);
        assert_eq!(
            Rho::from_decimal(1e6).unwrap().nanos(),
            1_000_000_000_000_000
        );
        assert_eq!(Rho::from_decimal(1.2e-9).unwrap().nanos(), 1);
        assert_eq!(Rho::from_decimal(1.7e-9).unwrap().nanos(), 2);
        assert_eq!(Rho::from_decimal(0.1).unwrap().nanos(), 100_000_000);
        for bad in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.1,
            1e6 + 1.0,
            1e300,
        ] {
            let e = Rho::from_decimal(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyError, "{bad}");
            assert!(e.message.contains("rho"), "{}", e.message);
        }

        for (nanos, text) in [
            (20_000_000, "0.02"),
            (0, "0"),
            (1_000_000_000, "1"),
            (1_500_000_000, "1.5"),
            (1, "0.000000001"),
            (1_000_000_000_000_000, "1000000"),
            (123_456_789_012, "123.456789012"),
        ] {
            let rho = Rho::from_nanos(nanos);
            assert_eq!(rho.to_string(), text);
            assert_eq!(Rho::from_decimal(text.parse().unwrap()).unwrap(), rho);
        }

        let rho = Rho::from_decimal(0.02).unwrap();
        assert_eq!(serde_json::to_string(&rho).unwrap(), "20000000");
        assert_eq!(serde_json::from_str::<Rho>("20000000").unwrap(), rho);
        assert_eq!(rho.as_f64(), 0.02);

        let a = Rho::from_nanos(10);
        assert_eq!(a.checked_add(Rho::from_nanos(5)), Some(Rho::from_nanos(15)));
        assert_eq!(
            Rho::from_nanos(u64::MAX).checked_add(Rho::from_nanos(1)),
            None
        );
        assert_eq!(a.saturating_sub(Rho::from_nanos(4)), Rho::from_nanos(6));
        assert_eq!(a.saturating_sub(Rho::from_nanos(11)), Rho::ZERO);
        assert_eq!(a.times(3), Some(Rho::from_nanos(30)));
        assert_eq!(Rho::from_nanos(u64::MAX).times(2), None);
        assert_eq!(a.split(3), Rho::from_nanos(3));
        assert!(a.split(3).times(3).unwrap() <= a);
        assert_eq!(a.split(0), Rho::ZERO);

        // ε at δ = 10⁻⁹ of ρ = 1: 1 + 2·√(ln 10⁹) = 1 + 2·√20.7233 = 10.1046.
        let eps = Rho::from_decimal(1.0).unwrap().epsilon_at(1e-9);
        assert!(
            (eps - (1.0 + 2.0 * (1e9f64).ln().sqrt())).abs() < 1e-12,
            "{eps}"
        );
        assert!((eps - 10.1046).abs() < 1e-3, "{eps}");
        assert_eq!(Rho::from_decimal(0.5).unwrap().epsilon_at(1.0), 0.5);
        assert_eq!(Rho::ZERO.epsilon_at(1e-9), 0.0);
        assert_eq!(a.epsilon_at(0.0), f64::INFINITY);
    }

    #[test]
    fn accuracy_metadata() {
        assert_eq!(combined_sd([3.0, 4.0]), 5.0);
        assert_eq!(combined_sd(std::iter::empty()), 0.0);
        assert!((interval95(5.0, 1) - 9.8).abs() < 1e-12);
        assert!((interval95(5.0, 0) - 9.8).abs() < 1e-12);
        assert!((interval95(5.0, 5) - 12.3).abs() < 1e-12);
    }

    #[test]
    fn no_floating_point_path_from_data_to_noise() {
        // The types: integers in, integers out, and the scale is an integer.
        let _: fn(i128, &NoiseScale) -> Result<i128, TallyError> = add_noise;
        let _: fn(u128, Rho) -> Result<NoiseScale, TallyError> = NoiseScale::for_sensitivity;
        let _: fn(&NoiseScale) -> u128 = NoiseScale::thousandths;
        let _: fn(u128) -> u128 = ceil_sqrt;
        let _: fn(&NoiseScale) -> RBig = NoiseScale::as_rational;

        // Exact at a boundary f64 cannot see. At ρ = 10⁻⁹ the target m² is Δ²·10¹⁵/2, so
        // Δ² = 5·10¹⁸ needs exactly σ = s/1000 with s = 5·10¹⁶, and one more unit of Δ² (the
        // target grows by 5·10¹⁴, far below an f64 ulp of 2.5·10³³, about 5.8·10¹⁷) needs
        // s + 1. A float computation cannot tell the two apart.
        let rho = Rho::from_nanos(1);
        let s: u128 = 50_000_000_000_000_000;
        for (sensitivity_squared, expected) in [
            (5_000_000_000_000_000_000 - 1, s),
            (5_000_000_000_000_000_000, s),
            (5_000_000_000_000_000_001, s + 1),
        ] {
            let scale = NoiseScale::for_sensitivity(sensitivity_squared, rho).unwrap();
            assert_eq!(scale.thousandths(), expected);
            assert_smallest_scale(sensitivity_squared, rho, &scale);
            let naive = (sensitivity_squared as f64 * 1e15 / 2.0).sqrt().ceil() as u128;
            if sensitivity_squared == 5_000_000_000_000_000_001 {
                assert_ne!(naive, expected, "f64 would have under-noised here");
            }
        }

        // And the source of the data-to-noise path names no float type.
        let source = include_str!("noise.rs");
        for start in [
            "    pub fn for_sensitivity(",
            "fn ceil_sqrt(",
            "pub fn add_noise(",
            "fn draw(",
            "    fn as_rational(",
        ] {
            let at = source.find(start).expect(start);
            let indent = &start[..start.len() - start.trim_start().len()];
            let end = source[at..].find(&format!("\n{indent}}}\n")).expect("end") + at;
            let body = &source[at..end];
            for float in ["f64", "f32"] {
                assert!(!body.contains(float), "{float} in {start}");
            }
        }
    }
}
