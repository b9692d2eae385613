//! What a worker holds: the profile arrangement (user → profile) and the features arrangement
//! (item → features), which are differential arrangements, and beside them the hand-made
//! structures that measurements kept: the item table with its dense feature cache, the
//! holders index, the user table, and each user's last output vector.

pub mod features;
pub mod holders;
pub mod items;
pub mod outputs;
pub mod profiles;
pub mod users;
