// Prints, for each pair of Avro schema files given (reader, writer), whether a
// reader with the first schema can read data written with the second, as the
// Avro project's SchemaCompatibility decides (what a Confluent Schema Registry
// checks: BACKWARD = new reader, old writer; FORWARD = old reader, new writer):
//
//     <reader> TAB <writer> TAB <description> TAB COMPATIBLE|INCOMPATIBLE
//
// Run with Debian's libavro-java on the class path (scripts/install-deps):
//     java -cp "$(scripts/java-classpath)" tests/interop/java/Compatibility.java R W [R W ...]
import java.io.File;
import org.apache.avro.Schema;
import org.apache.avro.SchemaCompatibility;

public class Compatibility {
    public static void main(String[] args) throws Exception {
        for (int i = 0; i + 1 < args.length; i += 2) {
            Schema reader = new Schema.Parser().parse(new File(args[i]));
            Schema writer = new Schema.Parser().parse(new File(args[i + 1]));
            SchemaCompatibility.SchemaPairCompatibility c =
                    SchemaCompatibility.checkReaderWriterCompatibility(reader, writer);
            String why = c.getDescription().replace('\n', ' ').replace('\t', ' ');
            System.out.println(args[i] + "\t" + args[i + 1] + "\t" + why + "\t" + c.getType());
        }
    }
}
