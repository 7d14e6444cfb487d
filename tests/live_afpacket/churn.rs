//! Short connections on reused 5-tuples, each counted once with its bytes
//! (`tests/common/churn.rs`).

use crate::common::churn::churn;
use crate::common::root::enabled;

/// As `live_tc`'s churn test, with AF_PACKET rings.
#[test]
fn reused_5_tuples_are_counted_once_each() {
    if !enabled("live_afpacket") {
        return;
    }
    churn("afpacket", "afp");
}
