// Prints what the Avro project's Java library (whose SchemaCompatibility a
// Confluent Schema Registry runs for its BACKWARD / FORWARD / FULL checks)
// says about reading data written with one schema using another:
//
//     <COMPATIBLE|INCOMPATIBLE> TAB <its description>
//
//     java -cp "$(scripts/java-classpath)" tests/interop/java/Compatibility.java READER.avsc WRITER.avsc
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import org.apache.avro.Schema;
import org.apache.avro.SchemaCompatibility;

public class Compatibility {
    static Schema parse(String file) throws Exception {
        String text = new String(Files.readAllBytes(Paths.get(file)), StandardCharsets.UTF_8);
        return new Schema.Parser().parse(text);
    }

    public static void main(String[] args) throws Exception {
        SchemaCompatibility.SchemaPairCompatibility c =
                SchemaCompatibility.checkReaderWriterCompatibility(parse(args[0]), parse(args[1]));
        System.out.println(c.getType() + "\t" + c.getDescription().replace('\n', ' '));
    }
}
