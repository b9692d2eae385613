//! Semantics §8 computed the plain way: from a snapshot of every user's kept history, count n(x)
//! and c(a, b) in ordered maps, sort each item's partners for its neighbours, and score one user
//! at a time by going over their window. Nothing is incremental and nothing is shared with the
//! dataflow, so that the dataflow's recommendations can be property-tested against it (over many
//! epochs: rebuild it from the current histories after each epoch and check every user whose
//! profile changed with [`RecommendReference::check_recommendations`]), and so that the
//! evaluation command can run the contract on a whole data set.
//!
//! Where §8 leaves a choice open, this module decides as follows; the paragraph is written to be
//! copied into the contract:
//!
//! > W(u) is a set: an item that occurs more than once in u's last `covisit_window` positions
//! > counts once in n(x), in c(a, b) and in the score, and k(a) is the distance of its newest
//! > occurrence (the smallest k). neighbours(a) are chosen among the items b with c(a, b) >= 1
//! > only, so an item with fewer partners has fewer than `neighbours` neighbours. The items that
//! > get a score (the candidates) are the items i, not in u's whole kept history, with
//! > i ∈ neighbours(a) for some a ∈ W(u); all other items score 0. The candidates are ranked by
//! > score (descending, ties to the smaller id as bytes) and the first `recommendations_n` kept;
//! > if there are fewer, the list is filled up, in order of n(x) descending and then id, with
//! > items that have n(x) >= 1 and are neither in the history nor already listed, each with score
//! > 0. So a list is shorter than `recommendations_n` only when fewer such items exist.
//! > `popular_items` is the first 100 items of that same popularity order, with their n(x).
//!
//! Scores are f64, each term `decay^k · c / sqrt(n(a) · n(i))` computed the same way for the
//! same (k, c, n(a), n(i)), and a user's terms added in order of k ascending (newest first), so
//! that scores equal in exact arithmetic and built from the same terms are equal in bits here.
//! Another implementation may round differently, which can swap two items whose scores agree to
//! the last bits; [`RecommendReference::check_recommendations`] accepts exactly such swaps.

use std::collections::{BTreeMap, BTreeSet};

/// Default of `--covisit-window` (semantics §7).
pub const DEFAULT_COVISIT_WINDOW: usize = 10;
/// Default of `--neighbours`.
pub const DEFAULT_NEIGHBOURS: usize = 20;
/// Default number of recommendations per user (the contract's, in the message crate).
pub const DEFAULT_RECOMMENDATIONS_N: usize = profile::DEFAULT_RECOMMENDATIONS_N;
/// How many items `popular_items` lists (the contract's, in the message crate).
pub const POPULAR_ITEMS: usize = profile::POPULAR_ITEMS;
/// Relative tolerance within which two implementations' scores count as equal.
pub const SCORE_TOLERANCE: f64 = 1e-9;

/// The settings of semantics §8; `Default` gives the contract's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecommendSettings {
    /// W: how many of a user's newest history positions make up W(u).
    pub covisit_window: usize,
    /// K: neighbours kept per item.
    pub neighbours: usize,
    /// N: length of a user's list.
    pub recommendations_n: usize,
    /// Recency decay, in (0, 1], the same setting as the interest vector's (§5).
    pub decay: f64,
}

impl Default for RecommendSettings {
    fn default() -> Self {
        RecommendSettings {
            covisit_window: DEFAULT_COVISIT_WINDOW,
            neighbours: DEFAULT_NEIGHBOURS,
            recommendations_n: DEFAULT_RECOMMENDATIONS_N,
            decay: profile::DEFAULT_DECAY,
        }
    }
}

/// One entry of a user's list, as `user_recs:{user_id}` holds it. Fill-up items have score 0.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f64,
}

/// One entry of `popular_items`: an item and n(x), the number of users whose window holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopularItem {
    pub item_id: String,
    pub users: u64,
}

/// One of an item's neighbours b, with c(a, b).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub item_id: String,
    pub covisits: u64,
}

/// W(u) with each item's k: the distinct items of `history`'s last `covisit_window` positions,
/// each with the distance of its newest occurrence from the newest item (0 for the newest).
pub fn window_distances<S: AsRef<str>>(
    history: &[S],
    covisit_window: usize,
) -> BTreeMap<&str, usize> {
    let mut distances = BTreeMap::new();
    // From the newest position back, so that the first k recorded for an item is its smallest.
    for (k, item) in history.iter().rev().take(covisit_window).enumerate() {
        distances.entry(item.as_ref()).or_insert(k);
    }
    distances
}

/// Whether `actual` equals `expected` to [`SCORE_TOLERANCE`], relative to the larger of the two.
pub fn scores_agree(actual: f64, expected: f64) -> bool {
    // Finite both: an infinite score would agree with anything by the relative bound.
    actual.is_finite()
        && expected.is_finite()
        && (actual - expected).abs() <= SCORE_TOLERANCE * actual.abs().max(expected.abs())
}

/// n(x), c(a, b), the neighbours and the popularity order of one snapshot of the profiles.
#[derive(Debug, Clone)]
pub struct RecommendReference {
    settings: RecommendSettings,
    /// n(x), for the items with n(x) >= 1.
    users_holding: BTreeMap<String, u64>,
    /// c(a, b) for a ≠ b, for the pairs with c(a, b) >= 1, by a then b (both directions).
    covisits: BTreeMap<String, BTreeMap<String, u64>>,
    /// neighbours(a), strongest first, for the items with at least one partner.
    neighbours: BTreeMap<String, Vec<Neighbour>>,
    /// Every item with n(x) >= 1: n(x) descending, then id.
    popularity_order: Vec<PopularItem>,
}

impl RecommendReference {
    /// The state of §8 for the users whose kept histories (oldest first) `histories` yields;
    /// which user each belongs to does not matter here. A user with an empty history has an
    /// empty window and adds nothing.
    pub fn new<H, S>(histories: impl IntoIterator<Item = H>, settings: RecommendSettings) -> Self
    where
        H: AsRef<[S]>,
        S: AsRef<str>,
    {
        let mut users_holding: BTreeMap<String, u64> = BTreeMap::new();
        let mut covisits: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for history in histories {
            let window = window_distances(history.as_ref(), settings.covisit_window);
            for &a in window.keys() {
                *users_holding.entry(a.to_owned()).or_default() += 1;
                for &b in window.keys().filter(|&&b| b != a) {
                    *covisits
                        .entry(a.to_owned())
                        .or_default()
                        .entry(b.to_owned())
                        .or_default() += 1;
                }
            }
        }
        let neighbours = covisits
            .iter()
            .map(|(a, partners)| {
                let mut ranked: Vec<Neighbour> = partners
                    .iter()
                    .map(|(b, &c)| Neighbour {
                        item_id: b.clone(),
                        covisits: c,
                    })
                    .collect();
                // String's Ord is byte order, as the contract's ties want.
                ranked.sort_by(|x, y| {
                    y.covisits
                        .cmp(&x.covisits)
                        .then_with(|| x.item_id.cmp(&y.item_id))
                });
                ranked.truncate(settings.neighbours);
                (a.clone(), ranked)
            })
            .collect();
        let mut popularity_order: Vec<PopularItem> = users_holding
            .iter()
            .map(|(item, &users)| PopularItem {
                item_id: item.clone(),
                users,
            })
            .collect();
        popularity_order.sort_by(|x, y| {
            y.users
                .cmp(&x.users)
                .then_with(|| x.item_id.cmp(&y.item_id))
        });
        RecommendReference {
            settings,
            users_holding,
            covisits,
            neighbours,
            popularity_order,
        }
    }

    /// n(x): the number of users whose window holds `item`.
    pub fn users_holding(&self, item: &str) -> u64 {
        self.users_holding.get(item).copied().unwrap_or(0)
    }

    /// c(a, b): the number of users whose window holds both; 0 when `a == b`.
    pub fn covisits(&self, a: &str, b: &str) -> u64 {
        self.covisits
            .get(a)
            .and_then(|partners| partners.get(b))
            .copied()
            .unwrap_or(0)
    }

    /// Every pair (a, b, c(a, b)) with c >= 1, in both directions, by a then b.
    pub fn all_covisits(&self) -> impl Iterator<Item = (&str, &str, u64)> + '_ {
        self.covisits.iter().flat_map(|(a, partners)| {
            partners
                .iter()
                .map(move |(b, &c)| (a.as_str(), b.as_str(), c))
        })
    }

    /// neighbours(a), strongest first; empty for an item without partners.
    pub fn neighbours(&self, a: &str) -> &[Neighbour] {
        self.neighbours.get(a).map_or(&[], Vec::as_slice)
    }

    /// `popular_items`: the first [`POPULAR_ITEMS`] items by n(x) descending, ties by id.
    pub fn popular_items(&self) -> &[PopularItem] {
        &self.popularity_order[..self.popularity_order.len().min(POPULAR_ITEMS)]
    }

    /// Every item with n(x) >= 1 in popularity order, which the fill-up draws from.
    pub fn popularity_order(&self) -> &[PopularItem] {
        &self.popularity_order
    }

    /// score(i) of every candidate i for a user with this kept history (oldest first).
    pub fn scores<S: AsRef<str>>(&self, history: &[S]) -> BTreeMap<String, f64> {
        let in_history: BTreeSet<&str> = history.iter().map(AsRef::as_ref).collect();
        let mut window: Vec<(usize, &str)> =
            window_distances(history, self.settings.covisit_window)
                .into_iter()
                .map(|(item, k)| (k, item))
                .collect();
        // Newest first: the documented order of summation.
        window.sort_unstable();
        let mut scores: BTreeMap<String, f64> = BTreeMap::new();
        for (k, a) in window {
            // Windows hold at most 10,000 positions (semantics §2), so k fits in an i32.
            let weight = self
                .settings
                .decay
                .powi(i32::try_from(k).expect("a window is at most 10,000 positions"));
            let n_a = self.users_holding(a);
            for neighbour in self.neighbours(a) {
                let i = neighbour.item_id.as_str();
                if in_history.contains(i) {
                    continue;
                }
                let n_i = self.users_holding(i);
                let term =
                    weight * neighbour.covisits as f64 / ((n_a as f64) * (n_i as f64)).sqrt();
                *scores.entry(i.to_owned()).or_default() += term;
            }
        }
        scores
    }

    /// The user's list: the top `recommendations_n` candidates by score (ties by id), filled up
    /// with popular items (score 0) not in the history.
    pub fn recommend<S: AsRef<str>>(&self, history: &[S]) -> Vec<ScoredItem> {
        let n = self.settings.recommendations_n;
        let mut list: Vec<ScoredItem> = self
            .scores(history)
            .into_iter()
            .map(|(item_id, score)| ScoredItem { item_id, score })
            .collect();
        list.sort_by(|x, y| {
            y.score
                .total_cmp(&x.score)
                .then_with(|| x.item_id.cmp(&y.item_id))
        });
        list.truncate(n);
        let in_history: BTreeSet<&str> = history.iter().map(AsRef::as_ref).collect();
        let listed: BTreeSet<String> = list.iter().map(|s| s.item_id.clone()).collect();
        let fill_up = self
            .popularity_order
            .iter()
            .filter(|p| !in_history.contains(p.item_id.as_str()) && !listed.contains(&p.item_id))
            .map(|p| ScoredItem {
                item_id: p.item_id.clone(),
                score: 0.0,
            });
        let room = n - list.len();
        list.extend(fill_up.take(room));
        list
    }

    /// Checks another implementation's list for a user with this kept history against
    /// [`recommend`](Self::recommend): the same length, at every position a score that agrees
    /// to [`SCORE_TOLERANCE`], and the same item, except that a candidate may stand where the
    /// reference has another one if its own reference score agrees with the score there (a tie
    /// that rounding broke the other way). Fill-up items must match exactly. The error says
    /// where and how the lists differ.
    pub fn check_recommendations<S: AsRef<str>>(
        &self,
        history: &[S],
        actual: &[ScoredItem],
    ) -> Result<(), String> {
        let expected = self.recommend(history);
        if actual.len() != expected.len() {
            return Err(format!(
                "{} items instead of {}: {actual:?}, expected {expected:?}",
                actual.len(),
                expected.len()
            ));
        }
        let scores = self.scores(history);
        let mut listed = BTreeSet::new();
        for (position, (got, want)) in actual.iter().zip(&expected).enumerate() {
            if !listed.insert(got.item_id.as_str()) {
                return Err(format!("{} is listed twice: {actual:?}", got.item_id));
            }
            if !scores_agree(got.score, want.score) {
                return Err(format!(
                    "position {position}: {got:?} where the reference has {want:?}"
                ));
            }
            if got.item_id == want.item_id {
                continue;
            }
            let tied = scores.get(&got.item_id).is_some_and(|&own| {
                scores.contains_key(&want.item_id) && scores_agree(got.score, own)
            });
            if !tied {
                return Err(format!(
                    "position {position}: {got:?} where the reference has {want:?} \
                     (reference score of {}: {:?})",
                    got.item_id,
                    scores.get(&got.item_id)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(
        covisit_window: usize,
        neighbours: usize,
        recommendations_n: usize,
    ) -> RecommendSettings {
        RecommendSettings {
            covisit_window,
            neighbours,
            recommendations_n,
            decay: 0.9,
        }
    }

    fn reference(histories: &[&[&str]], settings: RecommendSettings) -> RecommendReference {
        RecommendReference::new(histories.iter().copied(), settings)
    }

    fn ids(list: &[ScoredItem]) -> Vec<&str> {
        list.iter().map(|s| s.item_id.as_str()).collect()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            scores_agree(actual, expected),
            "{actual} against {expected}"
        );
    }

    /// u1 = [a, b, c], u2 = [a, b], u3 = [b, d]: n(a) = 2, n(b) = 3, n(c) = n(d) = 1;
    /// c(a, b) = 2, c(a, c) = c(b, c) = c(b, d) = 1.
    const SMALL: [&[&str]; 3] = [&["a", "b", "c"], &["a", "b"], &["b", "d"]];

    #[test]
    fn counts_users_and_pairs_in_both_directions() {
        let r = reference(&SMALL, RecommendSettings::default());
        let n: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|x| r.users_holding(x))
            .collect();
        assert_eq!(n, [2, 3, 1, 1, 0]);
        assert_eq!((r.covisits("a", "b"), r.covisits("b", "a")), (2, 2));
        assert_eq!((r.covisits("b", "d"), r.covisits("a", "d")), (1, 0));
        assert_eq!(r.covisits("a", "a"), 0);
        assert_eq!(r.all_covisits().count(), 8);
    }

    #[test]
    fn neighbours_rank_by_count_then_id_and_stop_at_k() {
        let r = reference(&SMALL, settings(10, 2, 10));
        let neighbours = |a| {
            r.neighbours(a)
                .iter()
                .map(|n| (n.item_id.as_str(), n.covisits))
                .collect::<Vec<_>>()
        };
        // c and d tie at 1 behind a; K = 2 keeps the smaller id.
        assert_eq!(neighbours("b"), [("a", 2), ("c", 1)]);
        assert_eq!(neighbours("a"), [("b", 2), ("c", 1)]);
        assert_eq!(neighbours("d"), [("b", 1)]);
        assert!(neighbours("e").is_empty());
    }

    #[test]
    fn scores_sum_decayed_normalised_counts_over_the_window() {
        let r = reference(&SMALL, RecommendSettings::default());
        // u2 = [a (k = 1), b (k = 0)]. From b: c and d, 1 / sqrt(3 · 1) each; from a: c,
        // 0.9 · 1 / sqrt(2 · 1). a and b themselves are in the history.
        let scores = r.scores(&["a", "b"]);
        assert_eq!(scores.len(), 2);
        assert_close(scores["c"], 1.0 / 3f64.sqrt() + 0.9 / 2f64.sqrt());
        assert_close(scores["d"], 1.0 / 3f64.sqrt());
        // Every item with n >= 1 is in the history or listed, so there is nothing to fill with.
        let list = r.recommend(&["a", "b"]);
        assert_eq!(ids(&list), ["c", "d"]);
        assert_close(list[1].score, 1.0 / 3f64.sqrt());
    }

    #[test]
    fn the_k_cut_off_removes_candidates() {
        // With K = 2, d is not among b's neighbours (a and c are), and d's own neighbours do
        // not matter to u2: d is not in u2's window.
        let r = reference(&SMALL, settings(10, 2, 10));
        let list = r.recommend(&["a", "b"]);
        assert_eq!(ids(&list), ["c", "d"]);
        assert_eq!(list[1].score, 0.0, "d comes in only as a fill-up");
        assert_eq!(r.scores(&["a", "b"]).len(), 1);
    }

    #[test]
    fn equal_scores_go_to_the_smaller_id_and_the_list_stops_at_n() {
        // x's partners p, q, r each co-occur with it once, and each is held by one user.
        let r = reference(
            &[&["p", "x"], &["q", "x"], &["r", "x"]],
            settings(10, 20, 2),
        );
        let list = r.recommend(&["x"]);
        assert_eq!(ids(&list), ["p", "q"]);
        assert_eq!(list[0].score, list[1].score);
        assert_close(list[0].score, 1.0 / 3f64.sqrt());
    }

    #[test]
    fn an_item_twice_in_the_window_counts_once_at_its_newest_position() {
        // u1's window holds a twice (k = 2 and k = 0) and b once.
        let r = reference(&[&["a", "b", "z", "a"], &["b", "c"]], settings(3, 20, 10));
        // W = 3: u1's window is {b, z, a}: the older a is outside it, the newer one inside.
        assert_eq!(r.users_holding("a"), 1);
        assert_eq!(r.covisits("a", "b"), 1, "a and b counted once for u1");
        assert_eq!(
            window_distances(&["a", "b", "z", "a"], 3),
            BTreeMap::from([("a", 0), ("b", 2), ("z", 1)])
        );
        // A user [c, a, x, a] (window {a, x} from W = 3: positions a, x, a): a at k = 0, not 2.
        let scores = r.scores(&["c", "a", "x", "a"]);
        // a's neighbours: b and z, each c = 1; n(a) = 1, n(b) = 2, n(z) = 1. x has none.
        assert_close(scores["b"], 1.0 / 2f64.sqrt());
        assert_close(scores["z"], 1.0);
        assert_eq!(scores.len(), 2);
    }

    #[test]
    fn the_whole_history_is_excluded_not_just_the_window() {
        let r = reference(&[&["a", "b"], &["b", "c"]], settings(1, 20, 10));
        // W = 1: the windows are {b} and {c}, so no pairs at all; n(b) = n(c) = 1.
        assert_eq!(r.all_covisits().count(), 0);
        let r = reference(&[&["a", "b"], &["a", "b"]], settings(2, 20, 10));
        // A user [b, x, a] with W = 2 has window {x, a}; b is a's neighbour but in the history.
        assert!(r.scores(&["b", "x", "a"]).is_empty());
        assert!(r.recommend(&["b", "x", "a"]).is_empty());
    }

    #[test]
    fn a_user_without_signal_gets_popular_items_in_order() {
        // n: a = 3, b = 2, c = 2, d = 1.
        let r = reference(
            &[&["a", "b"], &["a", "c"], &["a", "b", "c"], &["d"]],
            settings(10, 20, 3),
        );
        // y has no partners and is unknown: the list is all fill-up, b before c by id.
        let list = r.recommend(&["y"]);
        assert_eq!(ids(&list), ["a", "b", "c"]);
        assert!(list.iter().all(|s| s.score == 0.0));
        // [a, d]: a's neighbours b and c tie (0.9 · 2 / sqrt(3 · 2) each), d has none, and
        // nothing is left to fill with (a and d are in the history, b and c listed).
        assert_eq!(ids(&r.recommend(&["a", "d"])), ["b", "c"]);
        assert_eq!(ids(&r.recommend(&[] as &[&str])), ["a", "b", "c"]);
    }

    #[test]
    fn fill_up_skips_what_is_listed_and_comes_after_every_candidate() {
        // u = [s]: s's only partner is t, the most popular item (n: t = 3, a = 2, b = s = 1).
        let r = reference(
            &[&["s", "t"], &["t"], &["t"], &["a", "b"], &["a"]],
            settings(10, 20, 3),
        );
        let list = r.recommend(&["s"]);
        // t is listed as a candidate, so the fill-up skips it and takes a and b.
        assert_eq!(ids(&list), ["t", "a", "b"]);
        assert_close(list[0].score, 1.0 / 3f64.sqrt());
        assert_eq!((list[1].score, list[2].score), (0.0, 0.0));
    }

    #[test]
    fn popular_items_are_the_first_hundred_by_users_then_id() {
        // Item i{j} is held by j + 1 users, for j in 0..120; ties come from the duplicates.
        let mut histories: Vec<Vec<String>> = Vec::new();
        for j in 0..120u32 {
            for _ in 0..=(j / 2) {
                histories.push(vec![format!("i{j:03}")]);
            }
        }
        let r = RecommendReference::new(&histories, RecommendSettings::default());
        let popular = r.popular_items();
        assert_eq!(popular.len(), POPULAR_ITEMS);
        assert_eq!(r.popularity_order().len(), 120);
        // i118 and i119 are both held by 60 users; the smaller id first.
        assert_eq!(
            popular[..3],
            [
                PopularItem {
                    item_id: "i118".into(),
                    users: 60
                },
                PopularItem {
                    item_id: "i119".into(),
                    users: 60
                },
                PopularItem {
                    item_id: "i116".into(),
                    users: 59
                },
            ]
        );
        assert!(popular.windows(2).all(|w| w[0].users > w[1].users
            || (w[0].users == w[1].users && w[0].item_id < w[1].item_id)));
        assert_eq!(popular[99].users, 11);
    }

    #[test]
    fn decay_weighs_older_window_items_less() {
        // u's window [p (k = 2), q (k = 1), r (k = 0)]; each has one private partner.
        let r = reference(
            &[&["p", "pp"], &["q", "qq"], &["r", "rr"], &["p", "q", "r"]],
            RecommendSettings {
                decay: 0.5,
                ..RecommendSettings::default()
            },
        );
        let scores = r.scores(&["p", "q", "r"]);
        // n(p) = 2, n(pp) = 1: 0.25 / sqrt(2).
        assert_close(scores["pp"], 0.25 / 2f64.sqrt());
        assert_close(scores["qq"], 0.5 / 2f64.sqrt());
        assert_close(scores["rr"], 1.0 / 2f64.sqrt());
        assert_eq!(ids(&r.recommend(&["p", "q", "r"]))[..3], ["rr", "qq", "pp"]);
    }

    #[test]
    fn the_check_accepts_the_reference_and_near_ties_only() {
        let r = reference(
            &[&["p", "x"], &["q", "x"], &["r", "x"], &["a"]],
            settings(10, 20, 3),
        );
        let history = ["x"];
        let list = r.recommend(&history);
        assert_eq!(ids(&list), ["p", "q", "r"]);
        assert_eq!(r.check_recommendations(&history, &list), Ok(()));
        // q and p tie: swapped, with a last-bit difference, they still pass.
        let mut swapped = list.clone();
        swapped.swap(0, 1);
        swapped[0].score *= 1.0 + 1e-12;
        assert_eq!(r.check_recommendations(&history, &swapped), Ok(()));
        // A score off by more than the tolerance fails.
        let mut off = list.clone();
        off[2].score *= 1.0 + 1e-6;
        assert!(r.check_recommendations(&history, &off).is_err());
        // So does an infinite or NaN score, which the relative bound alone would let through.
        for bad in [f64::INFINITY, f64::NAN] {
            let mut broken = list.clone();
            broken[0].score = bad;
            assert!(r.check_recommendations(&history, &broken).is_err(), "{bad}");
        }
        // A missing or duplicated entry fails.
        assert!(r.check_recommendations(&history, &list[..2]).is_err());
        let twice = vec![list[0].clone(), list[0].clone(), list[2].clone()];
        assert!(r.check_recommendations(&history, &twice).is_err());
        // An item that is not a candidate cannot stand for one, whatever its score.
        let mut wrong = list.clone();
        wrong[2].item_id = "a".into();
        assert!(r.check_recommendations(&history, &wrong).is_err());
    }

    /// §8 read as literally as possible, sharing nothing with the reference but
    /// `scores_agree`: every count by a scan over all users, every item of the universe scored
    /// (0 when it is no neighbour), the list taken from all of them. Sums go in item-id order,
    /// not the reference's, so near-ties may round the other way, which the check tolerates.
    fn brute_force(
        histories: &[Vec<String>],
        settings: RecommendSettings,
        history: &[String],
    ) -> Vec<ScoredItem> {
        let window = |h: &[String]| -> Vec<String> {
            h[h.len().saturating_sub(settings.covisit_window)..].to_vec()
        };
        let holds = |h: &[String], x: &str| window(h).iter().any(|y| y == x);
        let n = |x: &str| histories.iter().filter(|h| holds(h, x)).count() as u64;
        let c = |a: &str, b: &str| {
            histories
                .iter()
                .filter(|h| a != b && holds(h, a) && holds(h, b))
                .count() as u64
        };
        let universe: BTreeSet<String> = histories.iter().flat_map(|h| window(h)).collect();
        let neighbours = |a: &str| -> Vec<String> {
            let mut partners: Vec<(u64, &String)> = universe
                .iter()
                .map(|b| (c(a, b), b))
                .filter(|(count, _)| *count > 0)
                .collect();
            partners.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.cmp(y.1)));
            partners
                .into_iter()
                .take(settings.neighbours)
                .map(|(_, b)| b.clone())
                .collect()
        };
        let user_window = window(history);
        let mut scored: Vec<(f64, bool, String)> = Vec::new();
        for i in universe.iter().filter(|i| !history.contains(i)) {
            let mut score = 0.0;
            let mut candidate = false;
            let distinct: BTreeSet<&String> = user_window.iter().collect();
            for a in distinct {
                let k = user_window.iter().rev().position(|x| x == a).unwrap();
                if neighbours(a).contains(i) {
                    candidate = true;
                    score += settings.decay.powi(k as i32) * c(a, i) as f64
                        / ((n(a) * n(i)) as f64).sqrt();
                }
            }
            scored.push((score, candidate, i.clone()));
        }
        let mut candidates: Vec<_> = scored.iter().filter(|s| s.1).collect();
        candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then_with(|| x.2.cmp(&y.2)));
        let mut list: Vec<ScoredItem> = candidates
            .iter()
            .take(settings.recommendations_n)
            .map(|s| ScoredItem {
                item_id: s.2.clone(),
                score: s.0,
            })
            .collect();
        let mut popular: Vec<&(f64, bool, String)> = scored.iter().filter(|s| !s.1).collect();
        popular.sort_by(|x, y| n(&y.2).cmp(&n(&x.2)).then_with(|| x.2.cmp(&y.2)));
        for p in popular {
            if list.len() == settings.recommendations_n {
                break;
            }
            list.push(ScoredItem {
                item_id: p.2.clone(),
                score: 0.0,
            });
        }
        list
    }

    #[test]
    fn agrees_with_a_brute_force_reading_of_the_contract_on_random_profiles() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for round in 0..40 {
            // Few items, so that windows overlap, items repeat within a window and ties abound.
            let items = rng.random_range(2..15);
            let users = rng.random_range(1..30);
            let histories: Vec<Vec<String>> = (0..users)
                .map(|_| {
                    let len = rng.random_range(0..14);
                    (0..len)
                        .map(|_| format!("i{}", rng.random_range(0..items)))
                        .collect()
                })
                .collect();
            let settings = RecommendSettings {
                covisit_window: rng.random_range(1..8),
                neighbours: rng.random_range(1..6),
                recommendations_n: rng.random_range(1..8),
                decay: [1.0, 0.9, 0.5][rng.random_range(0..3)],
            };
            let r = RecommendReference::new(&histories, settings);
            for history in &histories {
                let expected = brute_force(&histories, settings, history);
                r.check_recommendations(history, &expected)
                    .unwrap_or_else(|e| {
                        panic!("round {round}, {settings:?}, history {history:?}: {e}")
                    });
            }
        }
    }

    #[test]
    fn a_candidate_stands_for_another_only_if_they_tie() {
        // p shares two windows with x, q and r one each: p scores above the tied q and r.
        let r = reference(
            &[&["p", "x"], &["p", "x"], &["q", "x"], &["r", "x"]],
            settings(10, 20, 3),
        );
        let history = ["x"];
        let list = r.recommend(&history);
        assert_eq!(ids(&list), ["p", "q", "r"]);
        assert!(list[0].score > list[1].score * 1.1, "{list:?}");
        // p and q trade places, each carrying the other's score: every score agrees with the
        // reference's at its position, but neither item has that score.
        let mut traded = list.clone();
        traded[0].item_id = "q".into();
        traded[1].item_id = "p".into();
        assert!(r.check_recommendations(&history, &traded).is_err());
    }

    #[test]
    fn scores_agree_within_the_tolerance_relative_to_their_size() {
        for scale in [1e-3, 1.0, 1e3] {
            let close = scale * (1.0 + 0.5 * SCORE_TOLERANCE);
            let apart = scale * (1.0 + 2.0 * SCORE_TOLERANCE);
            assert!(scores_agree(close, scale), "{scale}");
            assert!(scores_agree(scale, close), "{scale}");
            assert!(!scores_agree(apart, scale), "{scale}");
            assert!(!scores_agree(scale, apart), "{scale}");
        }
        assert!(scores_agree(0.0, 0.0));
        assert!(!scores_agree(f64::NAN, f64::NAN));
        assert!(!scores_agree(f64::INFINITY, f64::INFINITY));
    }

    #[test]
    fn the_check_wants_fill_ups_exactly() {
        let r = reference(&[&["a", "b"], &["a", "c"], &["a"]], settings(10, 20, 2));
        let history = ["z"];
        let list = r.recommend(&history);
        assert_eq!(ids(&list), ["a", "b"]);
        let mut wrong = list.clone();
        wrong[1].item_id = "c".into();
        assert!(r.check_recommendations(&history, &wrong).is_err());
    }
}
