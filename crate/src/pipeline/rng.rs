//! The seeded normal generator: Philox 4x32-10 counters turned into normals by Box-Muller.
//!
//! Counter-based and computed with `libm` (no platform maths library), so a seed gives
//! bit-identical noise natively and in wasm32.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Ten Philox rounds over one 128-bit counter.
fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(ctr[0]);
        let p1 = u64::from(M1) * u64::from(ctr[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
        key = [key[0].wrapping_add(W0), key[1].wrapping_add(W1)];
    }
    ctr
}

/// A stream of standard normals; each draw starts at the next unused Philox block.
pub struct NormalRng {
    key: [u32; 2],
    counter: u64,
}

impl NormalRng {
    pub fn new(seed: u64) -> Self {
        Self { key: [seed as u32, (seed >> 32) as u32], counter: 0 }
    }

    /// `n` float32 standard normals. Each Philox block yields four.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 3);
        while out.len() < n {
            let block = philox4x32_10([self.counter as u32, (self.counter >> 32) as u32, 0, 0], self.key);
            self.counter += 1;
            for pair in block.chunks_exact(2) {
                // Uniforms in (0, 1): never 0, so the logarithm is finite.
                let u1 = (f64::from(pair[0]) + 0.5) / 4_294_967_296.0;
                let u2 = (f64::from(pair[1]) + 0.5) / 4_294_967_296.0;
                let radius = libm::sqrt(-2.0 * libm::log(u1));
                let angle = 2.0 * std::f64::consts::PI * u2;
                out.push((radius * libm::cos(angle)) as f32);
                out.push((radius * libm::sin(angle)) as f32);
            }
        }
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vector for Philox4x32-10 (counter and key from the digits of pi).
    #[test]
    fn philox_known_answer() {
        let out = philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]);
        assert_eq!(out, [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]);
    }

    #[test]
    fn normals_are_standard() {
        let v = NormalRng::new(42).normals(100_000);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn draws_continue_the_stream() {
        let all = NormalRng::new(7).normals(10);
        let mut rng = NormalRng::new(7);
        let mut parts = rng.normals(4);
        parts.extend(rng.normals(6));
        assert_eq!(all, parts);
        assert_ne!(NormalRng::new(8).normals(10), all);
    }
}
