//! Reply classification. Runs on arrival; the text is dropped right after, never
//! stored or logged. Conservative on purpose: a false "unsubscribe" silences a
//! customer, so template echoes (`回T退订`) and negations (`不退订`) are not opt-outs.

use super::event::ReplyClass;

/// Replies that are, once normalised, exactly an opt-out.
const UNSUBSCRIBE_EXACT: &[&str] = &[
    "td",
    "t",
    "n",
    "退订",
    "退定",
    "取消",
    "取消订阅",
    "退订短信",
    "不要再发",
    "别发了",
    "不要发了",
    "别再发了",
    "停止",
    "停止发送",
    "拒收",
    "stop",
    "unsubscribe",
    "stopall",
    "cancel",
    "end",
    "quit",
    "optout",
    "退",
];

/// Opt-out phrases that count when the whole reply is about stopping messages.
const UNSUBSCRIBE_PHRASES: &[&str] = &[
    "退订",
    "不要再发",
    "别发了",
    "别再发",
    "不要发了",
    "取消订阅",
    "拒收",
    "unsubscribe",
    "不要再给我发",
    "请勿再发",
    "别给我发",
];

/// Words that turn an opt-out phrase around or mark it as an echoed template.
const UNSUBSCRIBE_BLOCKERS: &[&str] = &[
    "不退订",
    "不要退订",
    "不取消",
    "回t退订",
    "回td退订",
    "回复t退订",
    "回复td退订",
    "退订回t",
    "退订回td",
    "别退订",
];

const RESUBSCRIBE: &[&str] = &[
    "订阅",
    "重新订阅",
    "恢复订阅",
    "恢复",
    "继续发",
    "可以发",
    "start",
    "subscribe",
    "unstop",
    "resubscribe",
    "yes start",
];

const POSITIVE_EXACT: &[&str] = &[
    "1", "好", "好的", "好滴", "可以", "行", "嗯", "恩", "是", "是的", "要", "需要", "ok", "okay",
    "yes", "y", "谢谢", "收到", "感谢",
];

const POSITIVE_PHRASES: &[&str] = &[
    "预约",
    "约一下",
    "想约",
    "想做",
    "怎么约",
    "什么时候可以",
    "有空",
    "多少钱",
    "价格",
    "报名",
    "感兴趣",
    "咨询",
    "想了解",
    "book",
    "appointment",
    "interested",
];

/// Normalises: full-width ASCII to half-width, lower case, drops whitespace and
/// punctuation (ASCII and CJK), so `ＴＤ。`, ` td ` and `T.D` compare equal.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(256));
    // Bounded work on untrusted input: a reply longer than this is not a keyword.
    for ch in text.chars().take(512) {
        let ch = match ch as u32 {
            0xFF01..=0xFF5E => char::from_u32(ch as u32 - 0xFEE0).unwrap_or(ch),
            0x3000 => ' ',
            _ => ch,
        };
        if ch.is_whitespace() || is_punct(ch) {
            continue;
        }
        for lower in ch.to_lowercase() {
            out.push(lower);
        }
    }
    out
}

fn is_punct(ch: char) -> bool {
    ch.is_ascii_punctuation()
        || matches!(
            ch,
            '。' | '，'
                | '、'
                | '！'
                | '？'
                | '；'
                | '：'
                | '“'
                | '”'
                | '‘'
                | '’'
                | '（'
                | '）'
                | '【'
                | '】'
                | '《'
                | '》'
                | '…'
                | '—'
                | '～'
                | '·'
                | '〜'
        )
}

/// Classifies one reply.
pub fn classify(text: &str) -> ReplyClass {
    let n = normalize(text);
    if n.is_empty() {
        return ReplyClass::Neutral;
    }
    if UNSUBSCRIBE_BLOCKERS.iter().any(|b| n.contains(b)) {
        // An echoed template or a negated opt-out: assent if it also says yes.
        return if POSITIVE_PHRASES.iter().any(|p| n.contains(p)) {
            ReplyClass::Positive
        } else {
            ReplyClass::Neutral
        };
    }
    if UNSUBSCRIBE_EXACT.contains(&n.as_str()) {
        return ReplyClass::Unsubscribe;
    }
    if RESUBSCRIBE.contains(&n.as_str()) {
        return ReplyClass::Resubscribe;
    }
    // Short replies built around an opt-out phrase ("请退订", "别发了谢谢").
    if n.chars().count() <= 24 && UNSUBSCRIBE_PHRASES.iter().any(|p| n.contains(p)) {
        return ReplyClass::Unsubscribe;
    }
    if POSITIVE_EXACT.contains(&n.as_str()) || POSITIVE_PHRASES.iter().any(|p| n.contains(p)) {
        return ReplyClass::Positive;
    }
    ReplyClass::Neutral
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_classes() {
        assert_eq!(classify("TD"), ReplyClass::Unsubscribe);
        assert_eq!(classify("ＴＤ"), ReplyClass::Unsubscribe);
        assert_eq!(classify("退订。"), ReplyClass::Unsubscribe);
        assert_eq!(classify("回T退订"), ReplyClass::Neutral);
        assert_eq!(classify("我不退订"), ReplyClass::Neutral);
        assert_eq!(classify("好的"), ReplyClass::Positive);
        assert_eq!(classify("想预约下周三"), ReplyClass::Positive);
        assert_eq!(classify("今天天气不错"), ReplyClass::Neutral);
        assert_eq!(classify("订阅"), ReplyClass::Resubscribe);
    }
}
