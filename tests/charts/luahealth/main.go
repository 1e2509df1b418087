// Command luahealth runs an Argo CD resource health script the way Argo CD does (gopher-lua, the
// object as the global `obj`) on each JSON object given, and prints one JSON line {status, message}
// per object. tests/charts/test_gitops.py uses it to test deploy/gitops/argocd/pipelinejob-health.lua.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
)

func toLua(L *lua.LState, v interface{}) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case []interface{}:
		t := L.NewTable()
		for _, item := range x {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]interface{}:
		t := L.NewTable()
		for k, item := range x {
			t.RawSetString(k, toLua(L, item))
		}
		return t
	}
	panic(fmt.Sprintf("unsupported JSON value %T", v))
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: luahealth SCRIPT.lua OBJECT.json...")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	for _, path := range os.Args[2:] {
		raw, err := os.ReadFile(path)
		if err != nil {
			panic(err)
		}
		var obj map[string]interface{}
		if err := json.Unmarshal(raw, &obj); err != nil {
			panic(err)
		}
		L := lua.NewState()
		L.SetGlobal("obj", toLua(L, obj))
		if err := L.DoString(string(script)); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			os.Exit(1)
		}
		hs, ok := L.Get(-1).(*lua.LTable)
		if !ok {
			fmt.Fprintf(os.Stderr, "%s: the script returned %s, not a table\n", path, L.Get(-1).Type())
			os.Exit(1)
		}
		out, _ := json.Marshal(map[string]string{
			"status":  hs.RawGetString("status").String(),
			"message": hs.RawGetString("message").String(),
		})
		fmt.Println(string(out))
		L.Close()
	}
}
