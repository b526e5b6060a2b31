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
    // "拒收请回复R" (carriers' marketing-SMS footer): a lone R is the refusal.
    "r",
    "退订td",
    "td退订",
    "退订t",
    "退退退",
    "退订退订",
    "tdtd",
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
    "别再给我打电话",
    "不要再打",
    "别打了",
    "stop",
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
    "回n退订",
    "回复n退订",
    "退订回n",
    "回r拒收",
    "回复r拒收",
    "拒收请回复r",
    "拒收回复r",
    "拒收回r",
    "别退订",
    "dontstop",
    "nonstop",
];

/// Cancelling a booking or order is a service matter for the clinic, not an opt-out.
const CANCELLATIONS: &[&str] = &["取消预约", "取消订单", "取消约", "取消手术", "取消疗程"];

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
    "收到",
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
    if CANCELLATIONS.iter().any(|c| n.contains(c)) {
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
    use ReplyClass::*;

    /// Real-world replies to clinic SMS/WeChat messages, with what they mean.
    const TABLE: &[(&str, ReplyClass)] = &[
        // Opt-outs, with case, whitespace, punctuation and full-width variants.
        ("TD", Unsubscribe),
        ("td", Unsubscribe),
        ("Td", Unsubscribe),
        (" TD ", Unsubscribe),
        ("TD。", Unsubscribe),
        ("ＴＤ", Unsubscribe),
        ("ｔｄ！", Unsubscribe),
        ("T D", Unsubscribe),
        ("T", Unsubscribe),
        ("t", Unsubscribe),
        ("退订", Unsubscribe),
        ("退订！", Unsubscribe),
        ("退订。。。", Unsubscribe),
        ("请退订", Unsubscribe),
        ("我要退订", Unsubscribe),
        ("退订谢谢", Unsubscribe),
        ("退订短信", Unsubscribe),
        ("取消", Unsubscribe),
        ("取消订阅", Unsubscribe),
        ("不要再发", Unsubscribe),
        ("不要再发了", Unsubscribe),
        ("别发了", Unsubscribe),
        ("别再发了，烦死了", Unsubscribe),
        ("别再给我打电话了", Unsubscribe),
        ("拒收", Unsubscribe),
        ("STOP", Unsubscribe),
        ("stop", Unsubscribe),
        ("Stop.", Unsubscribe),
        ("ＳＴＯＰ", Unsubscribe),
        ("Stop please", Unsubscribe),
        ("UNSUBSCRIBE", Unsubscribe),
        ("unsubscribe", Unsubscribe),
        ("我已经退订了你们还发", Unsubscribe),
        // Carrier and platform conventions: "拒收请回复R", "回N退订", 退 variants.
        ("R", Unsubscribe),
        ("r", Unsubscribe),
        ("Ｒ", Unsubscribe),
        ("r。", Unsubscribe),
        ("N", Unsubscribe),
        ("n", Unsubscribe),
        ("Ｎ", Unsubscribe),
        ("退", Unsubscribe),
        ("退！", Unsubscribe),
        ("退退退", Unsubscribe),
        ("退定", Unsubscribe),
        ("退订退订", Unsubscribe),
        ("TD退订", Unsubscribe),
        ("退订TD", Unsubscribe),
        ("t.d.", Unsubscribe),
        ("TDTD", Unsubscribe),
        ("ｔ", Unsubscribe),
        ("好的，不过以后别发了", Unsubscribe),
        // Not opt-outs: template echoes, negations, cancellations of a booking.
        ("回T退订", Neutral),
        ("回TD退订", Neutral),
        ("回复TD退订", Neutral),
        ("退订回T", Neutral),
        ("不退订", Neutral),
        ("我不要退订", Neutral),
        ("不取消", Neutral),
        ("取消预约", Neutral),
        ("明天的预约帮我取消预约一下", Neutral),
        ("TD是什么意思", Neutral),
        ("拒收请回复R", Neutral),
        ("回R拒收", Neutral),
        ("回复N退订", Neutral),
        ("退订回N", Neutral),
        // Ordinary short replies that merely contain an opt-out letter or 退.
        ("Re", Neutral),
        ("RR", Neutral),
        ("no", Neutral),
        ("NO", Neutral),
        ("nb", Neutral),
        ("hi", Neutral),
        ("退款", Neutral),
        ("退货", Neutral),
        ("退钱", Neutral),
        ("怎么退款", Neutral),
        ("退休了", Neutral),
        ("后退", Neutral),
        ("R8", Neutral),
        ("T1", Neutral),
        ("TT", Neutral),
        ("你好", Neutral),
        ("？", Neutral),
        ("", Neutral),
        ("   ", Neutral),
        // Strong engagement: assent and booking intent.
        ("好的", Positive),
        ("好", Positive),
        ("1", Positive),
        ("ok", Positive),
        ("OK!", Positive),
        ("预约", Positive),
        ("想预约周六下午", Positive),
        ("我想约一下水光针", Positive),
        ("多少钱？", Positive),
        ("收到，谢谢", Positive),
        ("不退订，想预约", Positive),
        // Re-subscribe.
        ("订阅", Resubscribe),
        ("重新订阅", Resubscribe),
        ("START", Resubscribe),
    ];

    #[test]
    fn real_world_replies_are_classified() {
        assert!(TABLE.len() >= 40);
        let wrong: Vec<_> = TABLE
            .iter()
            .filter(|(text, want)| classify(text) != *want)
            .map(|(text, want)| format!("{text:?}: want {want:?}, got {:?}", classify(text)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn work_is_bounded_on_huge_input() {
        let huge = "退".repeat(1_000_000);
        // Only the first 512 characters are looked at: a wall of text is not a keyword.
        assert_eq!(classify(&huge), Neutral);
        assert!(normalize(&huge).chars().count() <= 512);
    }
}
