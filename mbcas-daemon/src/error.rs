//! What every layer shares about errors: how one is printed, and the exit
//! code of a configuration error. A leaf: it imports nothing of the crate.

/// Exit code for invalid configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
