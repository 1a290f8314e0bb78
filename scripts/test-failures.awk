# From a dotnet test console log (verbosity normal): one line per failed test with its name, and
# under it the first and the last ten lines of its error message (a lab failure says what went
# wrong at the end; a lab hang, where it hangs: HangReport), each cut to 200 characters, so CI's
# tail says why and not only what.
function cut(s) { sub(/^[ \t]+/, "", s); return length(s) > 200 ? substr(s, 1, 200) "..." : s }
/^  Failed [A-Za-z]/ { name = $0; sub(/^  Failed /, "", name); sub(/ \[[^]]*\]$/, "", name); n = 0; inmsg = 0; next }
name != "" && /^  Error Message:/ { inmsg = 1; next }
name != "" && inmsg && /^  Stack Trace:/ {
    print "failed: " name
    if (n > 0) print "    | " cut(msg[1])
    for (i = (n > 11 ? n - 9 : 2); i <= n; i++) print "    | " cut(msg[i])
    name = ""; inmsg = 0; next
}
name != "" && inmsg && NF > 0 { msg[++n] = $0 }
