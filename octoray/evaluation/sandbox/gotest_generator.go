// Prepares one HumanEvalPack Go sample for building without the go command: reads the sample's
// test file and writes what `go test` would derive from it -- the import configs, vet.cfg and
// _testmain.go -- following cmd/go (go1.19: load/test.go, work/exec.go). Exit 0: OUTDIR is ready;
// exit 3: something only `go test` itself handles (parse errors, cgo, unknown imports, test
// functions with wrong signatures, ...): the caller runs `go test`.
package main

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/doc"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

const useGoTest = 3

type pkg struct {
	Export   string `json:"export"`
	Vetx     string `json:"vetx"`
	Standard bool   `json:"standard"`
}

type config struct {
	Packages map[string]pkg    `json:"packages"` // what a sample may import
	Testmain map[string]string `json:"testmain"` // the test main's imports -> export data
	Link     []string          `json:"link"`
	Modinfo  string            `json:"modinfo"`
}

type testFunc struct {
	Name, Output string
	Unordered    bool
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: octoray-gotest CONFIG ROOT FILE OUTDIR")
		os.Exit(2)
	}
	cfgPath, root, file, out := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	raw, err := os.ReadFile(cfgPath)
	check(err)
	var cfg config
	check(json.Unmarshal([]byte(strings.ReplaceAll(string(raw), "@ROOT@", root)), &cfg))

	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, nil, parser.ParseComments)
	if err != nil || strings.HasSuffix(f.Name.Name, "_test") {
		os.Exit(useGoTest)
	}
	imports := map[string]pkg{}
	for _, spec := range f.Imports {
		path, err := strconv.Unquote(spec.Path.Value)
		known, ok := cfg.Packages[path]
		if err != nil || !ok || path == "embed" {
			os.Exit(useGoTest) // "C" (cgo), a missing package, a local import, //go:embed ...
		}
		imports[path] = known
	}
	tests, examples, testMain, ok := testFuncs(f)
	if !ok {
		os.Exit(useGoTest)
	}
	importTest := len(tests) > 0 || len(examples) > 0 || testMain || hasExamples(f)

	check(os.MkdirAll(out, 0o755))
	paths := sortedKeys(imports)
	var compileCfg, testmainCfg, linkCfg strings.Builder
	compileCfg.WriteString("# import config\n")
	for _, p := range paths {
		fmt.Fprintf(&compileCfg, "packagefile %s=%s\n", p, imports[p].Export)
	}
	testmainCfg.WriteString("# import config\n")
	for _, p := range []string{"os", "reflect", "testing", "testing/internal/testdeps"} {
		fmt.Fprintf(&testmainCfg, "packagefile %s=%s\n", p, cfg.Testmain[p])
	}
	self := filepath.Join(out, "_pkg_.a")
	if importTest {
		fmt.Fprintf(&testmainCfg, "packagefile command-line-arguments=%s\n", self)
	}
	linkCfg.WriteString("# import config\n")
	for _, line := range cfg.Link {
		linkCfg.WriteString(line + "\n")
	}
	fmt.Fprintf(&linkCfg, "packagefile command-line-arguments=%s\n%s\n", self, cfg.Modinfo)

	vet := map[string]any{
		"ID": "command-line-arguments", "Compiler": "gc", "Dir": filepath.Dir(file),
		"ImportPath": "command-line-arguments", "GoFiles": []string{file},
		"NonGoFiles": []string{}, "IgnoredFiles": []string{},
		"ImportMap": map[string]string{}, "PackageFile": map[string]string{},
		"Standard": map[string]bool{}, "PackageVetx": map[string]string{},
		"VetxOnly": false, "VetxOutput": filepath.Join(out, "vet.out"),
		"SucceedOnTypecheckFailure": false,
	}
	for _, p := range paths {
		vet["ImportMap"].(map[string]string)[p] = p
		vet["PackageFile"].(map[string]string)[p] = imports[p].Export
		if imports[p].Standard {
			vet["Standard"].(map[string]bool)[p] = true
		}
		if imports[p].Vetx != "" {
			vet["PackageVetx"].(map[string]string)[p] = imports[p].Vetx
		}
	}
	vetJSON, err := json.MarshalIndent(vet, "", "\t")
	check(err)

	write(filepath.Join(out, "importcfg"), compileCfg.String())
	write(filepath.Join(out, "importcfg.testmain"), testmainCfg.String())
	write(filepath.Join(out, "importcfg.link"), linkCfg.String())
	write(filepath.Join(out, "vet.cfg"), string(vetJSON)+"\n")
	write(filepath.Join(out, "_testmain.go"), testmain(tests, examples, testMain, importTest))
}

// testFuncs follows cmd/go's testFuncs.load for one in-package test file; ok is false where
// go test reports an error (wrong signature, two TestMains).
func testFuncs(f *ast.File) (tests, examples []testFunc, testMain, ok bool) {
	for _, d := range f.Decls {
		n, isFunc := d.(*ast.FuncDecl)
		if !isFunc || n.Recv != nil {
			continue
		}
		name := n.Name.String()
		switch {
		case name == "TestMain":
			if isTestFunc(n, "T") {
				tests = append(tests, testFunc{Name: name})
				continue
			}
			if !validSignature(n, "M") || testMain {
				return nil, nil, false, false
			}
			testMain = true
		case isTest(name, "Test"):
			if !validSignature(n, "T") {
				return nil, nil, false, false
			}
			tests = append(tests, testFunc{Name: name})
		case isTest(name, "Benchmark"), isTest(name, "Fuzz"):
			// Listed by go test but never run without -bench/-fuzz; checked like tests.
			arg := map[bool]string{true: "B", false: "F"}[isTest(name, "Benchmark")]
			if !validSignature(n, arg) {
				return nil, nil, false, false
			}
			return nil, nil, false, false // rare in samples: leave them to go test
		}
	}
	ex := doc.Examples(f)
	sort.Slice(ex, func(i, j int) bool { return ex[i].Order < ex[j].Order })
	for _, e := range ex {
		if e.Output == "" && !e.EmptyOutput {
			continue // compiled, not run
		}
		examples = append(examples, testFunc{"Example" + e.Name, e.Output, e.Unordered})
	}
	return tests, examples, testMain, true
}

func hasExamples(f *ast.File) bool { return len(doc.Examples(f)) > 0 }

func validSignature(fn *ast.FuncDecl, arg string) bool {
	return isTestFunc(fn, arg) && fn.Type.TypeParams.NumFields() == 0
}

func isTestFunc(fn *ast.FuncDecl, arg string) bool {
	if fn.Type.Results != nil && len(fn.Type.Results.List) > 0 ||
		fn.Type.Params.List == nil || len(fn.Type.Params.List) != 1 ||
		len(fn.Type.Params.List[0].Names) > 1 {
		return false
	}
	ptr, ok := fn.Type.Params.List[0].Type.(*ast.StarExpr)
	if !ok {
		return false
	}
	if name, ok := ptr.X.(*ast.Ident); ok && name.Name == arg {
		return true
	}
	sel, ok := ptr.X.(*ast.SelectorExpr)
	return ok && sel.Sel.Name == arg
}

func isTest(name, prefix string) bool {
	if !strings.HasPrefix(name, prefix) {
		return false
	}
	if len(name) == len(prefix) {
		return true
	}
	r, _ := utf8.DecodeRuneInString(name[len(prefix):])
	return !unicode.IsLower(r)
}

// testmain is go1.19's _testmain.go for a package with in-package tests only, no coverage.
func testmain(tests, examples []testFunc, testMain, importTest bool) string {
	var b strings.Builder
	b.WriteString("// Code generated by 'go test'. DO NOT EDIT.\n\npackage main\n\nimport (\n\t\"os\"\n")
	if testMain {
		b.WriteString("\t\"reflect\"\n")
	}
	b.WriteString("\t\"testing\"\n\t\"testing/internal/testdeps\"\n")
	if importTest {
		alias := "_"
		if len(tests) > 0 || len(examples) > 0 || testMain {
			alias = "_test"
		}
		fmt.Fprintf(&b, "\t%s \"command-line-arguments\"\n", alias)
	}
	b.WriteString(")\n\nvar tests = []testing.InternalTest{\n")
	for _, t := range tests {
		fmt.Fprintf(&b, "\t{%q, _test.%s},\n", t.Name, t.Name)
	}
	b.WriteString("}\n\nvar benchmarks = []testing.InternalBenchmark{\n}\n\n")
	b.WriteString("var fuzzTargets = []testing.InternalFuzzTarget{\n}\n\n")
	b.WriteString("var examples = []testing.InternalExample{\n")
	for _, e := range examples {
		fmt.Fprintf(&b, "\t{%q, _test.%s, %q, %t},\n", e.Name, e.Name, e.Output, e.Unordered)
	}
	b.WriteString("}\n\nfunc init() {\n\ttestdeps.ImportPath = \"\"\n}\n\nfunc main() {\n")
	b.WriteString("\tm := testing.MainStart(testdeps.TestDeps{}, tests, benchmarks, fuzzTargets, examples)\n")
	if testMain {
		b.WriteString("\t_test.TestMain(m)\n\tos.Exit(int(reflect.ValueOf(m).Elem().FieldByName(\"exitCode\").Int()))\n")
	} else {
		b.WriteString("\tos.Exit(m.Run())\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func sortedKeys(m map[string]pkg) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func write(path, text string) { check(os.WriteFile(path, []byte(text), 0o644)) }

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "octoray-gotest:", err)
		os.Exit(useGoTest)
	}
}
