//! CPU quantities (pod specs, PodAllocations, flags): one parser, and the
//! stricter readers built on it agree with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::k8s::crd::CpuQuantity;

fuzz_target!(|s: &str| {
    let m = mbcas_common::quantity::millicores(s);
    if let Ok(q) = CpuQuantity::parse(s) {
        assert_eq!(Some(q.millis().0), m, "{s:?}");
    }
    if let Ok(f) = mbcas::config::parse_cpu(s) {
        assert_eq!(Some(f.0), m, "{s:?}");
    }
    if let Some(m) = m {
        // Millicores written back as Kubernetes writes them read the same.
        assert_eq!(
            mbcas_common::quantity::millicores(&format!("{m}m")),
            Some(m),
            "{s:?}"
        );
    }
});
