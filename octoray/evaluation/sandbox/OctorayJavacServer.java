// Reads sample directory names (one per line, relative to args[0]) and compiles each one's
// Main.java like `javac Main.java` run there; answers with javac's exit code. Started by
// octoray/evaluation/sandbox/java_compiler.py inside the sandbox.
import java.io.*;
import java.nio.charset.StandardCharsets;
import javax.tools.JavaCompiler;
import javax.tools.ToolProvider;

public final class OctorayJavacServer {
    public static void main(String[] args) throws IOException {
        JavaCompiler javac = ToolProvider.getSystemJavaCompiler();
        BufferedReader requests = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream answers = new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8");
        System.setOut(System.err);  // only answers go to the pipe
        answers.println("ready");
        String name;
        while ((name = requests.readLine()) != null) {
            if (name.isEmpty() || name.contains("/") || name.startsWith(".")) {
                answers.println("bad-request");
                continue;
            }
            String dir = args[0] + "/" + name;
            int code;
            try (OutputStream messages = new FileOutputStream(dir + "/.javac-messages")) {
                code = javac.run(null, messages, messages,
                                 "-proc:none", "-cp", dir, "-d", dir, dir + "/Main.java");
            } catch (Throwable failure) {  // out of memory, stack overflow: this JVM is done
                answers.println("crashed " + failure);
                System.exit(1);
                return;
            }
            answers.println(code);
        }
    }
}
