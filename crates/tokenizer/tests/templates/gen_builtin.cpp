// Writes builtin_llama_cpp.json: what llama.cpp's built-in chat formatters
// (llm_chat_apply_template in src/llama-chat.cpp) produce for a few conversations, the expected
// output of kiln's `--chat-template NAME` tests. Build against a llama.cpp checkout:
//   LC=path/to/llama.cpp
//   g++ -std=c++17 -I$LC/include -I$LC/ggml/include -I$LC/src gen_builtin.cpp $LC/src/llama-chat.cpp -o gen
//   ./gen > builtin_llama_cpp.json
#include <cstdio>
#include <string>
#include <vector>

#include "llama-chat.h"
#include "llama.h"

static std::string json_str(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\t': out += "\\t"; break;
            case '\r': out += "\\r"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += (char) c;
                }
        }
    }
    return out + "\"";
}

struct Conv {
    const char * name;
    std::vector<llama_chat_message> msgs;
};

int main() {
    // The names kiln implements.
    const char * names[] = {
        "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "gemma",
        "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken",
        "phi3", "phi4", "falcon3", "zephyr", "vicuna", "vicuna-orca", "deepseek", "deepseek3",
    };
    std::vector<Conv> convs = {
        // llama.cpp's own test conversation (tests/test-chat-template.cpp).
        {"multi_turn", {{"system", "You are a helpful assistant"}, {"user", "Hello"}, {"assistant", "Hi there"},
                        {"user", "Who are you"}, {"assistant", "   I am an assistant   "},
                        {"user", "Another question"}}},
        {"no_system", {{"user", " Hi!\n"}, {"assistant", "\tHello. "}, {"user", "What is 2+2?"}}},
        {"one_user", {{"user", "Hello"}}},
        {"system_user", {{"system", "  Be terse.\n"}, {"user", "Héllo wörld 🦙\n\nline two "}}},
    };
    printf("{\n  \"conversations\": {\n");
    for (size_t i = 0; i < convs.size(); i++) {
        printf("    %s: [", json_str(convs[i].name).c_str());
        for (size_t j = 0; j < convs[i].msgs.size(); j++) {
            printf("%s{\"role\": %s, \"content\": %s}", j ? ", " : "", json_str(convs[i].msgs[j].role).c_str(),
                   json_str(convs[i].msgs[j].content).c_str());
        }
        printf("]%s\n", i + 1 < convs.size() ? "," : "");
    }
    printf("  },\n  \"cases\": [\n");
    bool first = true;
    for (const char * name : names) {
        for (const auto & conv : convs) {
            for (bool add_ass : {true, false}) {
                std::vector<const llama_chat_message *> chat;
                for (const auto & m : conv.msgs) {
                    chat.push_back(&m);
                }
                std::string out;
                if (llm_chat_apply_template(llm_chat_template_from_str(name), chat, out, add_ass) < 0) {
                    fprintf(stderr, "%s failed\n", name);
                    return 1;
                }
                printf("%s    {\"template\": %s, \"conversation\": %s, \"add_generation_prompt\": %s, \"expected\": %s}",
                       first ? "" : ",\n", json_str(name).c_str(), json_str(conv.name).c_str(),
                       add_ass ? "true" : "false", json_str(out).c_str());
                first = false;
            }
        }
    }
    printf("\n  ]\n}\n");
    return 0;
}
