//! The default calibration text: about 7,000 words the project wrote for this purpose (fiction,
//! explainers, news, instructions, dialogue and assistant answers, letters, code, a table), so that
//! calibration works offline and without user data. It stands in for the mix of text a chat model
//! sees in prompts; calibrating on the user's own prompts is better when they are at hand.

pub const DEFAULT_CORPUS: &str = include_str!("../../data/calibration.txt");
