// The README's Java example ("Producing to lapse"): one marketing send in Avro
// single-object encoding with the Avro project's own BinaryMessageEncoder
// (C3 01 + CRC-64-AVRO fingerprint of the Parsing Canonical Form + body), keyed
// tenant/customer. Nothing here is lapse code.
//
// In a real producer the bytes go to Kafka:
//     producer.send(new ProducerRecord<>("engagement.sends", key, value));
// (KafkaProducer<String, byte[]> with StringSerializer / ByteArraySerializer).
// Here they are printed as "key TAB hex" so tests/java_interop.rs can hand them
// to lapse's decoder:
//     java -cp "$(scripts/java-classpath)" tests/interop/java/ProduceSend.java schemas/send.avsc 1767225600000
import java.io.File;
import java.nio.ByteBuffer;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageEncoder;

public class ProduceSend {
    public static void main(String[] args) throws Exception {
        // README-BEGIN
        Schema schema = new Schema.Parser().parse(new File(args[0])); // schemas/send.avsc
        long occurredAt = Long.parseLong(args[1]); // epoch milliseconds

        GenericRecord send = new GenericData.Record(schema);
        send.put("event_id", "crm-send-000042"); // unique per event: lapse's idempotency key
        send.put("tenant_id", "glow-clinics");
        send.put("customer_id", "c-0001");
        send.put("occurred_at", occurredAt);
        send.put("channel", new GenericData.EnumSymbol(schema.getField("channel").schema(), "WECHAT"));
        send.put("message_id", "msg-42");
        send.put("campaign_id", "spring-botox");
        send.put("purpose", new GenericData.EnumSymbol(schema.getField("purpose").schema(), "MARKETING"));
        send.put("cost", 1L); // fen; null takes the channel's default cost

        BinaryMessageEncoder<GenericRecord> encoder =
                new BinaryMessageEncoder<>(GenericData.get(), schema);
        ByteBuffer buffer = encoder.encode(send);
        byte[] value = new byte[buffer.remaining()];
        buffer.get(value);
        String key = send.get("tenant_id") + "/" + send.get("customer_id"); // exactly tenant/customer
        // producer.send(new ProducerRecord<>("engagement.sends", key, value)); // KafkaProducer<String, byte[]>
        // README-END

        StringBuilder hex = new StringBuilder();
        for (byte b : value) {
            hex.append(String.format("%02x", b));
        }
        System.out.println(key + "\t" + hex);
    }
}
