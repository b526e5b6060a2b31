// Prints, for each Avro schema file given, Java's Parsing Canonical Form and
// SchemaNormalization.parsingFingerprint64 (the reference implementation of the
// Avro specification; what BinaryMessageEncoder puts into single-object headers):
//
//     <file> TAB <fingerprint as a signed long> TAB <canonical form>
//
// Run with Debian's libavro-java on the class path (scripts/install-deps):
//     java -cp "$(scripts/java-classpath)" tests/interop/java/Fingerprints.java schemas/*.avsc
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

public class Fingerprints {
    public static void main(String[] args) throws Exception {
        for (String file : args) {
            String text = new String(Files.readAllBytes(Paths.get(file)), StandardCharsets.UTF_8);
            Schema schema = new Schema.Parser().parse(text);
            System.out.println(file + "\t" + SchemaNormalization.parsingFingerprint64(schema)
                    + "\t" + SchemaNormalization.toParsingForm(schema));
        }
    }
}
