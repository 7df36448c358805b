pub mod bench;
pub mod chat;
pub mod inspect;
pub mod logits;
pub mod parity;
pub mod run;
pub mod template;
pub mod tokenize;
