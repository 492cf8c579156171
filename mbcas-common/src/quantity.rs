//! CPU quantities as Kubernetes writes them, in millicores: the one parser the
//! daemon (pod specs, PodAllocations, flags) and xtask share.

/// Millicores of a Kubernetes quantity, rounded up like `Quantity.MilliValue()`.
///
/// Accepts decimal numbers (`2`, `0.5`, `+1.5`) with an optional exponent
/// (`1e3`, `1.5E-1`) or one of the SI (`n u m k M G T P E`) or binary
/// (`Ki Mi Gi Ti Pi Ei`) suffixes, surrounding whitespace ignored; refuses
/// negative values, overflow and garbage.
pub fn millicores(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    // value = mantissa × 10^exp10 × 2^exp2 milli-units, exactly.
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (3, 0),
        "n" => (-6, 0),
        "u" => (-3, 0),
        "m" => (0, 0),
        "k" => (6, 0),
        "M" => (9, 0),
        "G" => (12, 0),
        "T" => (15, 0),
        "P" => (18, 0),
        "E" => (21, 0),
        "Ki" => (3, 10),
        "Mi" => (3, 20),
        "Gi" => (3, 30),
        "Ti" => (3, 40),
        "Pi" => (3, 50),
        "Ei" => (3, 60),
        e if e.starts_with(['e', 'E']) => (e[1..].parse::<i32>().ok()?.checked_add(3)?, 0),
        _ => return None,
    };
    let mut mantissa: u128 = 0;
    for b in whole.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(b - b'0'))?;
    }
    let exp = exp10.checked_sub(i32::try_from(frac.len()).ok()?)?;
    if exp >= 0 {
        mantissa = mantissa.checked_mul(10u128.checked_pow(u32::try_from(exp).ok()?)?)?;
    } else {
        mantissa = mantissa.div_ceil(10u128.checked_pow(exp.unsigned_abs())?);
    }
    mantissa = mantissa.checked_mul(1u128.checked_shl(exp2)?)?;
    u64::try_from(mantissa).ok()
}
